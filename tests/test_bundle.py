"""Run driver + bundle: a tiny experiment end to end, save -> load -> same outputs."""

import contextlib
import json

import pytest
import torch

from chatforge.bundle import BundleError, load_bundle
from chatforge.config import ConfigError, validate_config
from chatforge.decoding import GenerationOptions
from chatforge.inference import Classifier, Seq2SeqGenerator, load_model
from chatforge.training.run import run_experiment

TINY = {"d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0}


def tiny_cfg(task: str, tmp_path, **train) -> dict:
    model = {"family": "transformer", "task": task, **TINY, "num_encoder_layers": 1}
    if task == "generation":
        model["num_decoder_layers"] = 1
    return {
        "name": f"tiny-{task}",
        "seed": 1,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1, "stratify": task == "classification"},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": model,
        "train": {"epochs": 1, "max_steps": 8, "batch_size": 16, "lr": 1e-3, "max_source_len": 24,
                  "max_target_len": 24, **train},
        "output": {"dir": str(tmp_path / "runs")},
    }


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    return run_experiment(validate_config(tiny_cfg("generation", tmp)), run_dir=tmp / "run")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    return run_experiment(validate_config(tiny_cfg("classification", tmp)), run_dir=tmp / "run")


def test_run_folder_layout(gen_run):
    assert (gen_run.run_dir / "config.yaml").is_file()
    metrics = json.loads((gen_run.run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["history"][0]["epoch"] == 1
    assert metrics["samples"] and {"question", "reference", "reply"} <= set(metrics["samples"][0])
    names = {p.name for p in gen_run.bundle_dir.iterdir()}
    assert {"weights.safetensors", "tokenizer.model", "config.yaml", "metadata.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no temp leftovers
    meta = json.loads((gen_run.bundle_dir / "metadata.json").read_text())
    assert meta["family"] == "transformer" and meta["task"] == "generation"
    assert len(meta["data_sha256"]) == 64 and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["num_parameters"] == metrics["num_parameters"]


def test_bundle_weights_are_not_pickles(gen_run):
    head = (gen_run.bundle_dir / "weights.safetensors").read_bytes()[:8]
    assert head[:2] != b"\x80\x02" and head[:2] != b"PK"  # neither pickle protocol nor zip (torch.save)


def test_save_load_same_outputs(gen_run):
    b1 = load_bundle(gen_run.bundle_dir)
    b2 = load_bundle(gen_run.bundle_dir)
    torch.manual_seed(0)
    src = torch.randint(4, b1.tokenizer.vocab_size, (2, 7))
    tgt = torch.randint(4, b1.tokenizer.vocab_size, (2, 5))
    with torch.inference_mode():
        a = b1.model(input_ids=src, decoder_input_ids=tgt).logits
        b = b2.model(input_ids=src, decoder_input_ids=tgt).logits
    assert torch.equal(a, b)
    # the loaded weights are the trained ones, not a fresh init
    from safetensors.torch import load_file

    saved = load_file(str(gen_run.bundle_dir / "weights.safetensors"))
    sd = b1.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())


def test_generator_streams_text(gen_run):
    g = load_model(gen_run.bundle_dir, name="chat")
    assert isinstance(g, Seq2SeqGenerator) and g.info.task == "generation"
    deltas = list(g.stream("안녕하세요", GenerationOptions(max_new_tokens=6)))
    assert 1 <= len(deltas) <= 6
    ids = [d.token_id for d in deltas]
    assert "".join(d.text for d in deltas) == g.tok.decode(ids)


def test_classifier_bundle(cls_run):
    assert (cls_run.bundle_dir / "labels.json").is_file()
    c = load_model(cls_run.bundle_dir, name="intent")
    assert isinstance(c, Classifier)
    preds = c.classify(["안녕하세요", "what's the weather like?"])
    assert len(preds) == 2
    for p in preds:
        assert p.label in c.labels
        assert abs(sum(p.scores.values()) - 1.0) < 1e-4
        assert p.score == max(p.scores.values())


def test_incomplete_bundle_is_refused(gen_run, tmp_path):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(gen_run.bundle_dir, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(BundleError, match="missing tokenizer.model"):
        load_bundle(broken)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_mismatched_weights_are_refused(gen_run, tmp_path):
    import shutil

    import yaml

    broken = tmp_path / "b"
    shutil.copytree(gen_run.bundle_dir, broken)
    cfg = yaml.safe_load((broken / "config.yaml").read_text())
    cfg["model"]["d_ff"] = 128
    (broken / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match="d_ff|size mismatch|shape"):
        load_bundle(broken)


def test_missing_data_file_fails_clearly(tmp_path):
    tree = tiny_cfg("generation", tmp_path)
    tree["data"]["path"] = str(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="file not found"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "r")


def test_init_from_reuses_tokenizer_and_weights(gen_run, tmp_path):
    tree = tiny_cfg("generation", tmp_path)
    tree["model"]["init_from"] = str(gen_run.run_dir)
    tree["train"]["max_steps"] = 1
    tree["train"]["lr"] = 1e-9
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "ft")
    assert res.metrics["init_from"]["new"] == 0 and res.metrics["init_from"]["loaded"] > 0
    a = load_bundle(gen_run.bundle_dir)
    b = load_bundle(res.bundle_dir)
    assert a.tokenizer.sha256 == b.tokenizer.sha256
    emb_a = next(iter(a.model.state_dict().values()))
    emb_b = next(iter(b.model.state_dict().values()))
    assert torch.allclose(emb_a, emb_b, atol=1e-5)


def test_init_from_with_no_tensor_in_common_is_refused(gen_run, tmp_path):
    """It used to train from scratch and report "0 loaded" in metrics.json as if it had fine-tuned."""
    tree = tiny_cfg("generation", tmp_path)
    tree["model"].update(init_from=str(gen_run.run_dir), d_model=48, d_ff=96)  # every tensor's shape differs
    with pytest.raises(ConfigError, match=r"model.init_from=.*none of its \d+ tensors matches"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "ft")


# ------------------------------------------------------------------ file permissions (issue #12, item 8)
def _modes(root):
    import os
    import stat

    return {p: stat.S_IMODE(os.stat(p).st_mode) for p in [root, *root.rglob("*")]}


def _assert_umask_modes(root, file_mode: int, dir_mode: int) -> None:
    modes = _modes(root)
    wrong = {str(p.relative_to(root)): oct(m) for p, m in modes.items()
             if m != (dir_mode if p.is_dir() else file_mode)}
    assert len(modes) > 3 and not wrong, f"expected files {oct(file_mode)}, folders {oct(dir_mode)}: {wrong}"


@pytest.mark.parametrize("which", ["gen_run", "cls_run"])
def test_saved_bundle_files_get_the_umask_permissions(which, request, tmp_path):
    """weights.safetensors used to be 0600 (safetensors' own temp file): unreadable for a server user."""
    import os

    from chatforge.bundle import save_bundle

    b = load_bundle(request.getfixturevalue(which).bundle_dir)
    old = os.umask(0o022)
    try:
        out = save_bundle(tmp_path / "b", model=b.model, tokenizer=b.tokenizer, config=b.config, labels=b.labels)
    finally:
        os.umask(old)
    _assert_umask_modes(out, 0o644, 0o755)


@contextlib.contextmanager
def _unprivileged():
    """Run the body with the permissions of an ordinary user: as root (e.g. in CI containers) file modes
    do not stop reads, so drop the effective uid/gid to nobody and restore them afterwards."""
    import os

    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_bundle_file_is_reported_as_permission_denied(gen_run):
    import os
    import shutil
    import tempfile
    from pathlib import Path

    # Not under tmp_path: pytest's base folder is private to its user, and nobody must reach the bundle.
    top = Path(tempfile.mkdtemp(prefix="chatforge-perm-"))
    try:
        os.chmod(top, 0o755)
        bundle = top / "bundle"
        shutil.copytree(gen_run.bundle_dir, bundle)
        for p in [bundle, *bundle.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        load_bundle(bundle)  # readable: loads (and imports everything the loader needs while privileged)
        # As root the files are root's, and owner-only modes (what the old writer left) lock nobody out;
        # as an ordinary user the files are our own, so only mode 0 locks us out.
        owner_only = os.geteuid() == 0
        os.chmod(bundle / "weights.safetensors", 0o600 if owner_only else 0)
        with pytest.raises(BundleError) as err, _unprivileged():
            load_bundle(bundle)
        msg = str(err.value)
        assert "permission denied" in msg and str(bundle / "weights.safetensors") in msg
        os.chmod(bundle / "weights.safetensors", 0o644)
        os.chmod(bundle, 0o700 if owner_only else 0)  # the folder itself: its files must not look "missing"
        with pytest.raises(BundleError, match="permission denied") as err, _unprivileged():
            load_bundle(bundle)
        assert "missing" not in str(err.value) and str(bundle) in str(err.value)
    finally:
        if (top / "bundle").exists():
            os.chmod(top / "bundle", 0o755)  # rmtree must be able to list it
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask077"])
def test_cli_train_and_evaluate_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    """The real CLI path: `chatforge train` (checkpoints, tokenizer, bundle, MLflow artifacts) and
    `chatforge evaluate` (JSON, Markdown, PNG) under a umask; every file and folder follows it."""
    import os
    import subprocess
    import sys

    import yaml

    tree = tiny_cfg("classification", tmp_path, checkpoint_every_steps=4)
    tree["output"]["dir"] = str(tmp_path / "runs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tree))
    env = {**os.environ, "CHATFORGE_ENV": "test"}

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "chatforge.cli", *args], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=300, preexec_fn=lambda: os.umask(umask))
        assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "runs" / "run"
    cli("train", str(tmp_path / "tiny.yaml"), "--run-dir", str(run), "--no-progress")
    cli("evaluate", str(run / "bundle"), "--out", str(run / "eval"))
    names = {p.name for p in (tmp_path / "runs").rglob("*")}
    assert {"weights.safetensors", "last.safetensors", "report.json", "metrics.json"} <= names, names
    assert any(n.endswith(".png") for n in names)
    _assert_umask_modes(tmp_path / "runs", file_mode, dir_mode)
