"""ByteNet's typed config (Kalchbrenner et al. 2016), validated at config load."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from chatforge.models.fields import PositiveInt, Probability
from chatforge.modules.dilated_conv import dilation_schedule


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class ByteNetConfig:
    """Hyper-parameters of ByteNet; the paper's translation model is d_model=1600 (2d = 1600 in its
    notation), kernel 3 (source) / 3 (target), dilations 1..16 repeated 5 times (section 3.4, 6).

    ``d_model`` is the residual width (the paper's 2d); each block narrows to d_model / 2.
    Dilations double per layer from 1 to ``max_dilation`` and the set repeats ``encoder_sets`` /
    ``decoder_sets`` times. Dynamic unfolding (section 3.2): the source network runs over the
    source extended to |t^| = ``unfold_a`` * |s| + ``unfold_b`` positions; the target network at
    step t reads source position t, and zeros once it unfolds past |t^|.
    """

    d_model: PositiveInt = 256
    encoder_kernel_size: PositiveInt = 3
    decoder_kernel_size: PositiveInt = 3
    max_dilation: PositiveInt = 16
    encoder_sets: PositiveInt = 2
    decoder_sets: PositiveInt = 2
    dropout: Probability = 0.1
    unfold_a: Annotated[float, Field(gt=0.0, le=10.0)] = 1.2
    unfold_b: Annotated[int, Field(ge=0, le=4096)] = 10
    max_len: PositiveInt = 512
    tie_embeddings: bool = False
    label_smoothing: Probability = 0.0
    input_unit: Literal["subword", "byte"] = "subword"  # what the source network reads (module docstring)

    @model_validator(mode="after")
    def _check(self) -> ByteNetConfig:
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even (residual blocks narrow to d_model / 2)")
        dilation_schedule(self.max_dilation, 1)  # raises naming the allowed values
        return self
