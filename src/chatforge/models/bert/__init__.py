"""The BERT family (Devlin et al. 2019): pre-training, sequence, pair and token classification."""

from chatforge.models.bert import pipeline  # noqa: F401  (registers the bert task pipelines)
from chatforge.models.bert.model import (
    TASKS,
    BertConfig,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    build,
)

__all__ = [
    "TASKS",
    "BertConfig",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "build",
]
