"""BERT's typed config (Devlin et al. 2019), validated at config load."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from chatforge.models.fields import PositiveInt, Probability


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class BertConfig:
    """Hyper-parameters of BERT (paper section 3; BERT-base is d_model 768, 12 layers, 12 heads,
    d_ff 3072). Defaults here are a small model that trains on a CPU.

    ``dropout`` is used for embeddings, attention probabilities and residual branches (the paper's
    0.1); ``vocab_size`` overrides the tokenizer's size (imported checkpoints whose embedding
    matrix is padded beyond the vocabulary); ``type_vocab_size`` is the number of segments.
    """

    d_model: PositiveInt = 256
    n_heads: PositiveInt = 4
    num_layers: PositiveInt = 4
    d_ff: PositiveInt = 1024
    dropout: Probability = 0.1
    max_len: PositiveInt = 512
    type_vocab_size: PositiveInt = 2
    layer_norm_eps: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-12
    initializer_range: Annotated[float, Field(gt=0.0)] = 0.02
    vocab_size: PositiveInt | None = None

    # The keys that fix the network a checkpoint's weights belong to: a fine-tune (model.init_from) takes the ones
    # its config leaves out from the pre-trained bundle and refuses ones that disagree (chatforge.training.run).
    ARCHITECTURE_KEYS: ClassVar[tuple[str, ...]] = (
        "d_model", "n_heads", "num_layers", "d_ff", "max_len", "type_vocab_size", "layer_norm_eps", "vocab_size")

    def architecture(self) -> dict[str, Any]:
        """The network these keys build: two configs build the same network iff these agree."""
        return {k: getattr(self, k) for k in self.ARCHITECTURE_KEYS}

    @model_validator(mode="after")
    def _heads_divide_d_model(self) -> BertConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        return self
