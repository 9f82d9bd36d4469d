"""The Transformer family (Vaswani et al. 2017): encoder-decoder generation and encoder classification."""

from chatforge.models.transformer.model import (
    TransformerClassifier,
    TransformerConfig,
    TransformerSeq2Seq,
    build,
    load_from_torch_transformer,
)

__all__ = [
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerSeq2Seq",
    "build",
    "load_from_torch_transformer",
]
