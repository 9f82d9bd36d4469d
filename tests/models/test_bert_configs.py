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


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("bert_*.yaml")), ids=lambda p: p.name)
def test_bert_configs_run_one_step(path, tmp_path, shared_data):
    tree = yaml.safe_load(path.read_text())
    data_path = Path(tree["data"]["path"])
    if not data_path.is_absolute():
        data_path = REPO / data_path
    if not data_path.is_file():
        pytest.skip(f"data file {data_path} not found (see ../shared/data/README.md)")
    overrides = [*SMALL, f"data.path={data_path}", f"output.dir={tmp_path / 'runs'}"]
    cfg = validate_config(apply_overrides(tree, overrides), source=str(path))
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 1 and (res.bundle_dir / "weights.safetensors").is_file()
