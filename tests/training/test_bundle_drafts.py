"""`chatforge bundle add-drafts` / ``training.bundle_drafts.add_drafts``: a generation bundle saved without
``drafts/`` gets the datastore training would have written, byte for byte, atomically; what would give another
datastore (another data file, drafts already there) is refused unless forced, and what is not a generation bundle
is refused naming the tasks that have drafts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatforge.bundle import BundleError, load_bundle
from chatforge.cli import app
from chatforge.config import validate_config
from chatforge.data import sample_corpus_path
from chatforge.drafts import DRAFTS_DIR, REPLIES_FILE, DraftIndex
from chatforge.training.bundle_drafts import AddDraftsError, add_drafts
from chatforge.training.run import file_sha256, run_experiment

runner = CliRunner()
DATA = "chitchat.csv"  # relative in the config, as a user's config often has it: the data folder is the cwd


def _tree(name: str, model: dict) -> dict:
    return {"name": name, "seed": 0, "data": {"path": DATA, "valid_fraction": 0.1, "test_fraction": 0.1},
            "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"}, "model": model,
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 16, "max_source_len": 24, "max_target_len": 24},
            "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Transformer generator (2 steps: the drafts do not depend on the weights), trained from a data folder,
    and the bytes of the drafts/replies.json training wrote."""
    root = tmp_path_factory.mktemp("add_drafts")
    data_dir = root / "data"
    data_dir.mkdir()
    shutil.copy(sample_corpus_path(), data_dir / DATA)
    model = {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
             "num_encoder_layers": 1, "num_decoder_layers": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(data_dir)
        result = run_experiment(validate_config(_tree("gen", model)), run_dir=root / "run")
    written = (result.bundle_dir / DRAFTS_DIR / REPLIES_FILE).read_bytes()
    return data_dir, result.bundle_dir, written


@pytest.fixture
def bundle(trained, tmp_path, monkeypatch):
    """A copy of the trained bundle without drafts/ (as trained before drafts existed), run from the data folder."""
    data_dir, src, _ = trained
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    shutil.rmtree(out / DRAFTS_DIR)
    monkeypatch.chdir(data_dir)
    return out


def _drafts(bundle: Path) -> bytes:
    return (bundle / DRAFTS_DIR / REPLIES_FILE).read_bytes()


def _hidden(bundle: Path) -> list[str]:
    return [p.name for p in bundle.iterdir() if p.name.startswith(".")]


def test_the_command_rebuilds_the_drafts_training_wrote_byte_for_byte(trained, bundle):
    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle)])
    assert r.exit_code == 0, r.output
    assert "drafts written" in r.output and "not the file the bundle was trained on" not in r.output
    assert _drafts(bundle) == trained[2]
    loaded = load_bundle(bundle)
    assert loaded.drafts is not None and len(loaded.drafts) > 0
    assert _hidden(bundle) == []


def test_the_library_function_reports_what_it_wrote(trained, bundle):
    added = add_drafts(bundle)
    assert _drafts(bundle) == trained[2]
    assert added.folder == bundle / DRAFTS_DIR and not added.replaced and added.data_matches
    assert added.replies == len(json.loads(trained[2])["replies"]) and added.nodes > added.replies
    assert added.data_sha256 == json.loads((bundle / "metadata.json").read_text())["data_sha256"]


def test_a_missing_data_file_names_where_it_was_expected_and_data_points_at_it(trained, bundle, tmp_path,
                                                                                 monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data.path is relative: the file is not here
    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle)])
    assert r.exit_code == 2
    assert f"training data file not found: {elsewhere / DATA}" in r.output
    assert f"data.path '{DATA}'" in r.output and "--data PATH" in r.output
    assert not (bundle / DRAFTS_DIR).exists()

    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle), "--data", str(trained[0] / DATA)])
    assert r.exit_code == 0, r.output
    assert _drafts(bundle) == trained[2]


def test_another_data_file_is_refused_with_both_hashes_unless_forced(trained, bundle, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text((trained[0] / DATA).read_text(encoding="utf-8") + "새 질문이야,새로운 답이에요!,greeting\n",
                     encoding="utf-8")
    recorded = json.loads((bundle / "metadata.json").read_text())["data_sha256"]
    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle), "--data", str(other)])
    assert r.exit_code == 2
    assert file_sha256(other) in r.output and recorded in r.output and "--force" in r.output
    assert not (bundle / DRAFTS_DIR).exists()

    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle), "--data", str(other), "--force"])
    assert r.exit_code == 0, r.output
    assert "drafts written" in r.output and "not the file the bundle was trained on (--force)" in r.output
    assert load_bundle(bundle).drafts is not None and _drafts(bundle) != trained[2]


def test_existing_drafts_are_refused_unless_forced_which_replaces_them(trained, bundle):
    (bundle / DRAFTS_DIR).mkdir()
    (bundle / DRAFTS_DIR / REPLIES_FILE).write_text("{damaged")  # load_bundle refuses it; --force is the repair
    with pytest.raises(BundleError, match="cannot read the draft datastore"):
        load_bundle(bundle)
    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle)])
    assert r.exit_code == 2
    assert f"{bundle} already has drafts ({bundle / DRAFTS_DIR}); give --force" in r.output
    assert _drafts(bundle) == b"{damaged"

    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle), "--force"])
    assert r.exit_code == 0, r.output
    assert "drafts replaced" in r.output
    assert _drafts(bundle) == trained[2] and load_bundle(bundle).drafts is not None
    assert _hidden(bundle) == []


def test_what_is_not_a_bundle_is_refused_naming_what_is_missing(trained, tmp_path):
    r = runner.invoke(app, ["bundle", "add-drafts", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and f"bundle not found: {tmp_path / 'nowhere'} is not a folder" in r.output
    r = runner.invoke(app, ["bundle", "add-drafts", str(tmp_path)])
    assert r.exit_code == 2
    assert f"{tmp_path} is not a chatforge bundle: missing metadata.json, config.yaml" in r.output
    run_dir = trained[1].parent
    r = runner.invoke(app, ["bundle", "add-drafts", str(run_dir)])
    assert r.exit_code == 2 and f"its bundle is {run_dir / 'bundle'}" in r.output


def test_a_bundle_of_another_task_is_refused_naming_the_tasks_with_drafts(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained[0])
    tree = {**_tree("cls", {"family": "linear", "task": "classification"}), "output": {"dir": str(tmp_path)}}
    tree["data"]["stratify"] = True
    bundle = run_experiment(validate_config(tree), run_dir=tmp_path / "run").bundle_dir
    r = runner.invoke(app, ["bundle", "add-drafts", str(bundle)])
    assert r.exit_code == 2
    assert f"{bundle} is a classification bundle (family linear)" in r.output
    assert "generation bundles only (tasks: generation, lm)" in r.output
    assert not (bundle / DRAFTS_DIR).exists()


@pytest.mark.parametrize("earlier", [False, True])
def test_an_interrupted_write_leaves_the_bundle_as_it_was(trained, bundle, monkeypatch, earlier):
    if earlier:
        shutil.copytree(trained[1] / DRAFTS_DIR, bundle / DRAFTS_DIR)
    save = DraftIndex.save

    def interrupted(self, folder):
        save(self, folder)  # the whole file is written ...
        (Path(folder) / "partial").write_text("half")
        raise KeyboardInterrupt  # ... and then Ctrl-C, before the folder is renamed into place

    monkeypatch.setattr(DraftIndex, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_drafts(bundle, force=earlier)
    if earlier:
        assert sorted(p.name for p in (bundle / DRAFTS_DIR).iterdir()) == [REPLIES_FILE]
        assert _drafts(bundle) == trained[2]
    else:
        assert not (bundle / DRAFTS_DIR).exists()
    assert _hidden(bundle) == []


def test_a_refusal_is_an_error_of_the_library_too(bundle, tmp_path):
    add_drafts(bundle)
    with pytest.raises(AddDraftsError, match="already has drafts"):
        add_drafts(bundle)
    with pytest.raises(AddDraftsError, match="training data file not found"):
        add_drafts(bundle, data=tmp_path / "missing.csv", force=True)
