"""GPT's typed config (Radford et al. 2018; GPT-2 with ``variant: gpt2``), validated at config load."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from chatforge.models.fields import PositiveInt, Probability


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class GPTConfig:
    """Hyper-parameters of GPT / GPT-2; defaults are a small model for a 2-core CPU.

    The paper's model is d_model=768, n_heads=12, n_layers=12, d_ff=3072, n_positions=512,
    dropout 0.1 (section 4.1). ``d_ff`` defaults to 4·d_model. ``aux_lm_weight`` is λ of
    ``L3 = L2 + λ·L1`` for classification; ``loss_on_prompt`` also trains generation on the question.
    """

    variant: Literal["gpt", "gpt2"] = "gpt"
    d_model: PositiveInt = 256
    n_heads: PositiveInt = 4
    n_layers: PositiveInt = 4
    d_ff: PositiveInt | None = None
    n_positions: PositiveInt = 512
    dropout: Probability = 0.1  # embeddings and residual branches (HF: embd_pdrop, resid_pdrop)
    attn_dropout: Probability = 0.1  # attention probabilities (HF: attn_pdrop)
    activation: Literal["gelu", "gelu_tanh", "relu"] | None = None  # None: the variant's
    norm_first: bool | None = None  # None: the variant's (gpt: post-LN, gpt2: pre-LN)
    final_norm: bool | None = None  # None: the variant's (gpt: no, gpt2: yes)
    layer_norm_epsilon: float = Field(1e-5, gt=0.0, lt=1.0)
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0.0, le=1.0)
    aux_lm_weight: float = Field(0.5, ge=0.0, le=100.0)
    loss_on_prompt: bool = False
    classifier_dropout: Probability = 0.1
    label_smoothing: Probability = 0.0
    # Embedding (and LM head) rows when the checkpoint pads its vocabulary past the tokenizer's ids, as HF
    # checkpoints often do (to a multiple of 8 or 64, for the matmul kernels): None builds one row per tokenizer
    # id. Rows beyond the tokenizer stand for no token: their logits are cut off, so they are never predicted,
    # sampled or trained towards. Fewer rows than tokenizer ids is refused when the model is built.
    vocab_rows: PositiveInt | None = None

    # The keys that fix the network a checkpoint's weights belong to. A fine-tune (model.init_from) takes the
    # ones its config leaves out from the pre-trained bundle, and refuses ones that disagree with it
    # (chatforge.training.run); dropout, losses and the classifier head stay the fine-tune's own.
    ARCHITECTURE_KEYS: ClassVar[tuple[str, ...]] = (
        "variant", "d_model", "n_heads", "n_layers", "d_ff", "n_positions", "activation", "norm_first",
        "final_norm", "layer_norm_epsilon", "bias", "tie_embeddings", "vocab_rows")

    @model_validator(mode="after")
    def _heads_divide_d_model(self) -> GPTConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(each head gets d_model / n_heads dimensions)"
            )
        return self

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def act(self) -> str:
        return self.activation or ("gelu_tanh" if self.variant == "gpt2" else "gelu")

    @property
    def pre_ln(self) -> bool:
        return self.norm_first if self.norm_first is not None else self.variant == "gpt2"

    @property
    def has_final_norm(self) -> bool:
        return self.final_norm if self.final_norm is not None else self.variant == "gpt2"

    def architecture(self) -> dict[str, Any]:
        """The network these keys build, the variant's defaults resolved: two configs build the same network
        (shapes and computation) when these are equal, however their YAML spells it."""
        return {"d_model": self.d_model, "n_heads": self.n_heads, "n_layers": self.n_layers, "d_ff": self.ff_dim,
                "n_positions": self.n_positions, "activation": self.act, "norm_first": self.pre_ln,
                "final_norm": self.has_final_norm, "layer_norm_epsilon": self.layer_norm_epsilon,
                "bias": self.bias, "tie_embeddings": self.tie_embeddings, "vocab_rows": self.vocab_rows}
