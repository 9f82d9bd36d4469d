"""benchmarks/train_precision.py: fp32 against bf16 training steps of shipped configs' models, and auto's pick."""

from __future__ import annotations

import json

import pytest
import torch
from tests.benchmarks.conftest import load

from chatforge.runtime import pick_train_precision, read_cpu_flags


@pytest.fixture(scope="module")
def script():
    return load("train_precision")


@pytest.mark.parametrize("config", ["clinc150_transformer.yaml", "gpt_chatbot_kr.yaml", "chatbot_kr_transformer.yaml"])
def test_the_batch_fits_the_configs_model_and_gives_a_loss(script, config):
    cfg, model, inputs = script._model_and_batch(config, 2)
    out = model(**inputs)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert inputs["input_ids"].size(0) == 2
    # same seed, same weights: fp32 and bf16 time one network
    _, again, _ = script._model_and_batch(config, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_main_writes_both_precisions_the_ratio_and_the_machine(script, tmp_path):
    out = tmp_path / "tp.json"
    script.main(["--configs", "clinc150_transformer.yaml", "--batch", "2", "--steps", "1", "--repeats", "1",
                 "--out", str(out)])
    r = json.loads(out.read_text())
    row = r["rows"][0]
    assert set(row["seconds_per_step"]) == {"fp32", "bf16"} and all(v > 0 for v in row["seconds_per_step"].values())
    assert row["bf16_over_fp32_time"] == pytest.approx(
        row["seconds_per_step"]["bf16"] / row["seconds_per_step"]["fp32"], rel=0.01)
    assert r["auto_picks"]["precision"] == pick_train_precision(read_cpu_flags()[1])[0]
    assert r["lscpu_model"] and "load_average" in r["machine_before"]
