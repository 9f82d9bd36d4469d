"""Reusable layers that take plain numbers (d_model, heads, dropout), shared by every family."""

from chatforge.modules.attention import (
    GrowingKVCache,
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
)
from chatforge.modules.embeddings import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEmbedding,
    TokenEmbedding,
    sinusoidal_table,
)
from chatforge.modules.feedforward import FeedForward, make_activation
from chatforge.modules.linear import (
    PackedLinear,
    apply_linear,
    linear_fn,
    onednn_linear_available,
    pack_linear_layers,
)
from chatforge.modules.transformer_layers import (
    DecoderLayerCache,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    load_stack_from_torch,
)

__all__ = [
    "DecoderLayerCache",
    "FeedForward",
    "GrowingKVCache",
    "KVCache",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "PackedLinear",
    "SinusoidalPositionalEmbedding",
    "TokenEmbedding",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "apply_linear",
    "causal_mask",
    "linear_fn",
    "load_stack_from_torch",
    "make_activation",
    "onednn_linear_available",
    "pack_linear_layers",
    "padding_mask",
    "sinusoidal_table",
]
