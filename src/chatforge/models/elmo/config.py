"""ELMo's typed config (Peters et al. 2018), validated at config load."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from chatforge.models.fields import PositiveInt, Probability


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class ElmoConfig:
    """Hyper-parameters of ELMo. The paper's model (section 3.4): 2048 character n-gram filters,
    2 highway layers, projection 512, 2 biLSTM layers of 4096 units projected to 512, a residual
    connection between the LSTM layers. Defaults here are a small model of the same shape.

    ``filters`` is a list of ``[width, count]``; ``max_chars`` bytes per token including the
    begin/end-of-word markers. ``freeze_lm`` (classification): true keeps the biLM fixed and
    learns only the scalar mix and the classifier (the paper's frozen features), false fine-tunes
    everything. ``mix_layer_norm`` normalises each layer before mixing (section 3.2).
    """

    max_chars: Annotated[int, Field(ge=3, le=64)] = 16
    char_embed_dim: PositiveInt = 16
    filters: list[tuple[PositiveInt, PositiveInt]] = Field(
        default_factory=lambda: [(1, 32), (2, 32), (3, 64), (4, 128), (5, 256)])
    num_highway: Annotated[int, Field(ge=0, le=8)] = 2
    projection_dim: PositiveInt = 128
    lstm_hidden: PositiveInt = 512
    num_lstm_layers: Annotated[int, Field(ge=1, le=8)] = 2
    residual: bool = True
    dropout: Probability = 0.1
    # classification
    freeze_lm: bool = False
    mix_layer_norm: bool = False
    pooling: Literal["mean", "max"] = "mean"
    classifier_hidden: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _check(self) -> ElmoConfig:
        if not self.filters:
            raise ValueError("filters must list at least one [width, count] pair, e.g. [[1, 32], [2, 64]]")
        widest = max(w for w, _ in self.filters)
        if widest > self.max_chars:
            raise ValueError(f"filter width {widest} is wider than max_chars={self.max_chars}; "
                             f"use widths <= max_chars or raise max_chars")
        if self.lstm_hidden < self.projection_dim:
            raise ValueError(f"lstm_hidden={self.lstm_hidden} must be >= projection_dim={self.projection_dim} "
                             f"(the LSTM state is projected down to projection_dim)")
        return self
