"""benchmarks/clinc150_dev_splits.py: the hold-out variants it compares are what their names say."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.benchmarks.conftest import load

from chatforge.config import load_config
from chatforge.data import Example

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load("clinc150_dev_splits")


def test_contiguous_hold_out_takes_one_run_per_label(script):
    examples = [Example(f"{lab}{i}", label=lab) for i in range(10) for lab in "ab"]
    kept, held = script.contiguous(examples, 0.3, lambda n, k: 0)  # head
    assert sorted(e.text for e in held) == ["a0", "a1", "a2", "b0", "b1", "b2"] and len(kept) == 14
    _, held = script.contiguous(examples, 0.3, lambda n, k: 4)
    assert sorted(e.text for e in held) == ["a4", "a5", "a6", "b4", "b5", "b6"]


def test_every_variant_is_a_valid_config_and_blocks_stay_inside_the_list(script):
    names = []
    for name, overrides, start in script.variants(0.2):
        names.append(name)
        cfg = load_config(ROOT / "configs" / "linear_svm_clinc150.yaml",
                          ["tracking.enabled=false", "oos.policy=train", "data.dev_fraction=0.2", *overrides])
        assert cfg.data.dev_split in ("hashed", "tail")
        if start is not None:
            for _ in range(50):
                s = start(100, 20)
                assert 0 <= s <= 80
    assert "tail (data.dev_split: tail)" in names and sum(n.startswith("hashed") for n in names) == 4
