"""Response selection (retrieval-first chit-chat): TF-IDF, bi-/poly-encoder matchers and a learned ranker over a reply pool."""

from chatforge.baselines.retrieval.config import RetrievalConfig
from chatforge.baselines.retrieval.model import BiEncoder, PolyEncoder, ResponseSelector, build
from chatforge.registry import register_family

__all__ = ["BiEncoder", "PolyEncoder", "ResponseSelector", "RetrievalConfig", "build"]

register_family("retrieval", config_cls=RetrievalConfig, builder=build, tasks=("selection",), kind="estimator")
