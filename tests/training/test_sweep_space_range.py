"""A sweep space is checked whole before any trial: a choice or a range end the config refuses used to be found
trial by trial (each failed trial logged as a traceback; the study went on with fewer trials, or none)."""

from __future__ import annotations

import pytest
from tests.training.test_sweep import _tree

from chatforge.config import ConfigError, validate_config
from chatforge.training.sweep import check_space, parse_space


@pytest.mark.parametrize("space, bad", [
    ({"train.schedule": {"type": "categorical", "choices": ["cosine", "bogus"]}}, "train.schedule = 'bogus'"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 5.0}}, "train.lr = 5.0"),
    ({"model.num_encoder_layers": {"type": "int", "low": 1, "high": 2},
      "train.batch_size": {"type": "int", "low": 16, "high": 100_000}}, "train.batch_size = 100000"),
])
def test_every_choice_and_both_range_ends_must_fit_the_config(tmp_path, space, bad):
    base = validate_config(_tree(tmp_path, None))
    with pytest.raises(ConfigError, match=f"does not fit the config \\({bad}\\)"):
        check_space(base, parse_space(space))
