"""The BERT family (Devlin et al. 2019): pre-training, sequence, pair and token classification."""

from chatforge.models.bert import pipeline  # noqa: F401  (registers the bert task pipelines)
from chatforge.models.bert.config import BertConfig
from chatforge.models.bert.model import (
    TASKS,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    build,
)
from chatforge.registry import register_family

__all__ = [
    "TASKS",
    "BertConfig",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "build",
]

register_family("bert", config_cls=BertConfig, builder=build, tasks=TASKS)
