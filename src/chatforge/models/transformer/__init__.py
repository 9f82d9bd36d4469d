"""The Transformer family (Vaswani et al. 2017): encoder-decoder generation and encoder classification."""

from chatforge.models.transformer.config import TransformerConfig
from chatforge.models.transformer.model import (
    TransformerClassifier,
    TransformerSeq2Seq,
    build,
    load_from_torch_transformer,
)
from chatforge.models.transformer.step import Seq2SeqStepModel
from chatforge.registry import register_family

__all__ = [
    "Seq2SeqStepModel",
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerSeq2Seq",
    "build",
    "load_from_torch_transformer",
]

register_family("transformer", config_cls=TransformerConfig, builder=build, tasks=("generation", "classification"),
                step_model=Seq2SeqStepModel)
