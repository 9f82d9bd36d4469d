"""Corpus data: readers, deterministic splits, the download registry and the shipped sample corpus."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from chatforge.data.download import DATASETS, DatasetFile, DatasetSpec, DownloadError, download
from chatforge.data.readers import (
    CHATBOT_KR_LABELS,
    FORMATS,
    DataError,
    DataFileNotFoundError,
    Example,
    ReadReport,
    read_examples,
)
from chatforge.data.splits import Splits, split_examples

__all__ = [
    "CHATBOT_KR_LABELS",
    "DATASETS",
    "FORMATS",
    "DataError",
    "DataFileNotFoundError",
    "DatasetFile",
    "DatasetSpec",
    "DownloadError",
    "Example",
    "ReadReport",
    "Splits",
    "download",
    "read_examples",
    "sample_corpus_path",
    "split_examples",
]


def sample_corpus_path() -> Path:
    """Path of the bilingual (Korean + English) chit-chat/intent corpus shipped with chatforge.

    Columns ``Q,A,label`` (the chatbot_csv layout, labels are intent names); ``read_examples(path)``
    reads it. The package is installed as plain files (setuptools
    package-data), so the traversable is a real path.
    """
    return Path(str(resources.files("chatforge.data") / "sample" / "chitchat.csv"))
