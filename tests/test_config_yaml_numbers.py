"""Numbers in the config file: a YAML boolean where a number belongs is refused (pydantic's lax mode read
`epochs: true` as 1 epoch), and a float written without a dot (`1e9`, `1e-3`; YAML 1.1 reads it as text) is the
number it looks like, so a range check, not "not a valid integer", says what is wrong."""

from __future__ import annotations

import pytest
import yaml

from chatforge.config import ConfigError, load_config

BASE = ("name: t\ndata: {path: sample}\n"
        "model: {family: transformer, task: generation, d_model: 32, n_heads: 4, num_encoder_layers: 1,"
        " num_decoder_layers: 1, d_ff: 64}\n")


def _write(tmp_path, extra: str):
    f = tmp_path / "c.yaml"
    f.write_text(BASE + extra)
    return f


@pytest.mark.parametrize("extra, key", [
    ("train: {epochs: true}\n", "train.epochs"),
    ("train: {lr: yes}\n", "train.lr"),
    ("seed: on\n", "seed"),
    ("train: {betas: [true, 0.98]}\n", "train.betas.0"),
    ("oos: {threshold: false}\n", "oos.threshold"),
])
def test_a_boolean_where_a_number_belongs_is_refused(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=rf"{key}: expected a number, got (true|false) \(a YAML boolean"):
        load_config(_write(tmp_path, extra))


def test_a_boolean_for_a_family_number_is_refused_before_its_own_checks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(BASE.replace("d_model: 32", "d_model: yes"))
    with pytest.raises(ConfigError, match=r"model\.d_model: expected a number, not a YAML boolean"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"model\.dropout: expected a number, not a YAML boolean"):
        load_config(_write(tmp_path, ""), overrides=["model.dropout=true"])


def test_the_same_through_set(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected a number, got true"):
        load_config(_write(tmp_path, ""), overrides=["train.epochs=true"])


def test_booleans_stay_booleans_where_they_belong(tmp_path):
    cfg = load_config(_write(tmp_path, "tracking: {enabled: false}\ntrain: {deterministic: yes}\n"),
                      overrides=["model.tie_embeddings=false"])
    assert cfg.tracking.enabled is False and cfg.train.deterministic is True
    assert cfg.model.family_config().tie_embeddings is False


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    cfg = load_config(_write(tmp_path, "train: {lr: 1e-3, batch_size: 1e3, weight_decay: 1E-2}\n"),
                      overrides=["train.epochs=2e0"])
    assert cfg.train.lr == pytest.approx(0.001) and cfg.train.weight_decay == pytest.approx(0.01)
    assert cfg.train.batch_size == 1000 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.epochs == 2


def test_an_exponent_out_of_range_is_a_range_error_not_a_parse_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: Input should be less than or equal to 65536"):
        load_config(_write(tmp_path, "train: {batch_size: 1e9}\n"))
    with pytest.raises(ConfigError, match=r"train\.batch_size: Input should be a valid integer"):
        load_config(_write(tmp_path, "train: {batch_size: 1.5e0}\n"))


def test_plain_safe_load_is_not_changed():
    # the resolver belongs to chatforge's own loader, not to PyYAML's SafeLoader that other code shares
    assert yaml.safe_load("a: 1e9")["a"] == "1e9"


@pytest.mark.parametrize("override, key", [("train.epochs=null", "train.epochs"), ("data=~", "data"),
                                           ("model.d_model=null", "model.d_model")])
def test_a_null_where_a_value_is_needed_says_null(tmp_path, override, key):
    # YAML's null (also ~ or nothing after the colon): the error said what was wrong but not what was written
    with pytest.raises(ConfigError, match=rf"{key}: .*\(got null\)"):
        load_config(_write(tmp_path, ""), overrides=[override])
