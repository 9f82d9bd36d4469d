"""Response selection (retrieval-first chit-chat): TF-IDF, bi-/poly-encoder matchers and a learned ranker over a reply pool."""

from chatforge.baselines.retrieval.config import RetrievalConfig
from chatforge.baselines.retrieval.model import BiEncoder, PolyEncoder, ResponseSelector, build
from chatforge.registry import register_family

__all__ = ["BiEncoder", "PolyEncoder", "ResponseSelector", "RetrievalConfig", "build"]


def requires(cfg: RetrievalConfig) -> tuple[str, ...]:
    """Every selector reads TF-IDF features (scikit-learn, SciPy's sparse matrices); the XGBoost ranker its trees;
    ``search: faiss`` its saved indexes."""
    return ("sklearn", "scipy", *(("xgboost",) if cfg.encoder == "ranker" and cfg.ranker == "xgboost" else ()),
            *(("faiss",) if cfg.search == "faiss" else ()))


register_family("retrieval", config_cls=RetrievalConfig, builder=build, tasks=("selection",), kind="estimator",
                requires=requires)
