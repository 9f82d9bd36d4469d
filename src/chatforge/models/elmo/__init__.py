"""The ELMo family (Peters et al. 2018): a character-CNN biLM and its classifier."""

from chatforge.models.elmo import pipeline  # noqa: F401  (registers the elmo task pipelines)
from chatforge.models.elmo.config import ElmoConfig
from chatforge.models.elmo.model import (
    CHAR_BOW,
    CHAR_EOW,
    CHAR_OFFSET,
    ElmoClassifier,
    ElmoLanguageModel,
    build,
    spell_pieces,
)
from chatforge.registry import register_family

__all__ = [
    "CHAR_BOW",
    "CHAR_EOW",
    "CHAR_OFFSET",
    "ElmoClassifier",
    "ElmoConfig",
    "ElmoLanguageModel",
    "build",
    "spell_pieces",
]

register_family("elmo", config_cls=ElmoConfig, builder=build, tasks=("lm", "classification"))
