"""The ELMo family (Peters et al. 2018): a character-CNN biLM and its classifier."""

from chatforge.models.elmo import pipeline  # noqa: F401  (registers the elmo task pipelines)
from chatforge.models.elmo.model import (
    CHAR_BOW,
    CHAR_EOW,
    CHAR_OFFSET,
    ElmoClassifier,
    ElmoConfig,
    ElmoLanguageModel,
    build,
    spell_pieces,
)

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
