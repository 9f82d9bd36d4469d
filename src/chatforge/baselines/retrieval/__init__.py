"""Response selection (retrieval-first chit-chat): TF-IDF and bi-encoder matchers over a reply pool."""

from chatforge.baselines.retrieval.config import RetrievalConfig
from chatforge.baselines.retrieval.model import BiEncoder, ResponseSelector, build
from chatforge.registry import register_family

__all__ = ["BiEncoder", "ResponseSelector", "RetrievalConfig", "build"]

register_family("retrieval", config_cls=RetrievalConfig, builder=build, tasks=("selection",), kind="estimator")
