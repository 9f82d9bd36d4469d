"""Run driver + bundle: a tiny experiment end to end, save -> load -> same outputs."""

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
