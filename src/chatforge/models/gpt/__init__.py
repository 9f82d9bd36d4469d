"""The GPT family (Radford et al. 2018): decoder-only LM, generation and classification heads."""

from chatforge.models.gpt import pipeline  # noqa: F401  (registers the gpt task pipelines)
from chatforge.models.gpt.config import GPTConfig
from chatforge.models.gpt.model import GPT_TASKS, GPTClassifier, GPTLMHeadModel, GPTModel, GPTState, build
from chatforge.models.gpt.step import GPTStepModel
from chatforge.registry import register_family

__all__ = [
    "GPT_TASKS",
    "GPTClassifier",
    "GPTConfig",
    "GPTLMHeadModel",
    "GPTModel",
    "GPTState",
    "GPTStepModel",
    "build",
]

register_family("gpt", config_cls=GPTConfig, builder=build, tasks=GPT_TASKS, step_model=GPTStepModel)
