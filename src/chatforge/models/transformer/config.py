"""The Transformer's typed config (Vaswani et al. 2017), validated at config load."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from chatforge.models.fields import PositiveInt, Probability


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class TransformerConfig:
    """Hyper-parameters of the Transformer; defaults are a small "base"-shaped model.

    ``norm_first`` selects pre-LN (Xiong et al. 2020) over the paper's post-LN; ``tie_embeddings``
    shares source/target embeddings and the output projection (paper section 3.4);
    ``label_smoothing`` is the paper's epsilon_ls = 0.1 (section 5.4), used for both tasks;
    ``pooling`` is used by classification only.
    """

    d_model: PositiveInt = 256
    n_heads: PositiveInt = 4
    num_encoder_layers: PositiveInt = 3
    num_decoder_layers: PositiveInt = 3
    d_ff: PositiveInt = 1024
    dropout: Probability = 0.1
    activation: Literal["relu", "gelu"] = "relu"
    max_len: PositiveInt = 512
    norm_first: bool = False
    tie_embeddings: bool = True
    label_smoothing: Probability = 0.1
    pooling: Literal["mean", "first"] = "mean"

    @model_validator(mode="after")
    def _heads_divide_d_model(self) -> TransformerConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(each head gets d_model / n_heads dimensions)"
            )
        return self
