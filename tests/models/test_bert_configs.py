"""Every configs/bert_*.yaml builds and runs one optimizer step on its real data (tiny overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatforge.config import apply_overrides, validate_config
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]

SMALL = ["model.d_model=32", "model.n_heads=2", "model.num_layers=1", "model.d_ff=64",
         "train.max_steps=1", "train.epochs=1", "train.batch_size=8", "train.max_source_len=24",
         "tracking.enabled=false", "tokenizer.vocab_size=2000",
         "tokenizer.on_vocab_too_large=lower"]


def _repo_path(value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else REPO / p


def _run_one_step(path: Path, run_dir: Path, extra: list[str] = ()):
    tree = yaml.safe_load(path.read_text())
    data_path = _repo_path(tree["data"]["path"])
    if not data_path.is_file():
        pytest.skip(f"data file {data_path} not found (see ../shared/data/README.md)")
    overrides = [*SMALL, f"data.path={data_path}", f"output.dir={run_dir.parent / 'runs'}", *extra]
    for key in ("outliers", "unlabelled"):  # the configs' other data files, read from the checkout's root
        if tree["data"].get(key):
            overrides.append(f"data.{key}={_repo_path(tree['data'][key])}")
    cfg = validate_config(apply_overrides(tree, overrides), source=str(path))
    return run_experiment(cfg, run_dir=run_dir)


def _pretraining_config(tree: dict) -> Path:
    """The shipped pre-training config (task mlm or mlm_nsp) on the same data as a fine-tune config."""
    for p in sorted((REPO / "configs").glob("bert_*.yaml")):
        other = yaml.safe_load(p.read_text())
        if other["model"]["task"] in ("mlm", "mlm_nsp") and other["data"]["path"] == tree["data"]["path"]:
            return p
    raise AssertionError(f"no pre-training config on {tree['data']['path']} for a config with model.init_from")


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("bert_*.yaml")), ids=lambda p: p.name)
def test_bert_configs_run_one_step(path, tmp_path, shared_data):
    tree = yaml.safe_load(path.read_text())
    extra = []
    if tree["model"].get("init_from"):
        # A fine-tune config: its pre-training run comes first (one step too), as its comment says.
        pre = _run_one_step(_pretraining_config(tree), tmp_path / "pre")
        extra = [f"model.init_from={pre.run_dir}"]
    res = _run_one_step(path, tmp_path / "run", extra)
    assert res.metrics["steps"] == 1 and (res.bundle_dir / "weights.safetensors").is_file()
    if extra:
        assert res.metrics["init_from"]["new"] == 2  # the whole backbone came from the pre-trained run
