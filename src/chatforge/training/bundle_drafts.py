"""Add the datastore of speculative decoding (``drafts/``) to a generation bundle saved without it.

Bundles trained before ``drafts/`` existed are served without speculative decoding, and retraining only to get
the training replies back is hours for a real corpus. The replies are a function of what the bundle already
records: its ``config.yaml`` names the data file and the split settings, its tokenizer encodes them. So the
training split is read again through ``run.load_splits`` (the very function training used, not a re-implemented
split) and the index is built by ``drafts.training_replies`` (the very call training makes), which gives the
``drafts/replies.json`` training would have written, byte for byte.

What could make that a different datastore is refused before anything is written: a data file other than the
one trained on (``metadata.json`` ``data_sha256``), or drafts already there (``force`` overrides both). The
folder is written beside its place and renamed in (``fileio.atomic_dir``), so an interrupted run leaves the
bundle as it was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chatforge.bundle import CONFIG, METADATA, BundleError, bundle_tokenizer
from chatforge.config import ExperimentConfig, validate_config
from chatforge.drafts import DRAFTS_DIR, training_replies
from chatforge.fileio import atomic_dir
from chatforge.tasks import TaskDataError, generating_tasks, get_task
from chatforge.training.run import file_sha256, load_splits, resolve_data_path

log = logging.getLogger(__name__)


class AddDraftsError(ValueError):
    """Drafts that cannot be added as asked; the message names what is wrong and what would be accepted."""


@dataclass(frozen=True)
class AddedDrafts:
    """What ``add_drafts`` wrote: ``folder`` (``BUNDLE/drafts``) with ``replies`` training replies in a trie of
    ``nodes`` nodes, read from ``data_path`` (sha256 ``data_sha256``; ``trained_sha256`` is the one the bundle
    records, None when it records none); ``replaced``: an earlier ``drafts/`` was replaced."""

    bundle: Path
    folder: Path
    replies: int
    nodes: int
    data_path: Path
    data_sha256: str
    trained_sha256: str | None
    replaced: bool

    @property
    def data_matches(self) -> bool:
        return self.data_sha256 == self.trained_sha256


def _read_bundle(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metadata.json`` and the ``config.yaml`` tree of a bundle folder, without loading its weights (a bundle
    whose ``drafts/`` is damaged must still get new ones)."""
    if not path.is_dir():
        raise BundleError(f"bundle not found: {path} is not a folder")
    missing = [n for n in (METADATA, CONFIG) if not (path / n).is_file()]
    if missing:
        hint = (f"; {path} looks like a run folder: its bundle is {path / 'bundle'}"
                if (path / "bundle" / METADATA).is_file() else "")
        raise BundleError(f"{path} is not a chatforge bundle: missing {', '.join(missing)}{hint}")
    try:
        metadata = json.loads((path / METADATA).read_text(encoding="utf-8"))
        tree = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise BundleError(f"{path} is not a chatforge bundle: cannot read its {METADATA} / {CONFIG} ({e})") from None
    if not isinstance(metadata, dict) or not isinstance(tree, dict):
        raise BundleError(f"{path} is not a chatforge bundle: {METADATA} and {CONFIG} must each hold a mapping")
    return metadata, tree


def _check_generates(path: Path, metadata: dict[str, Any], cfg: ExperimentConfig) -> None:
    task, family = cfg.model.task, cfg.model.family
    try:
        generates = metadata.get("kind") != "estimator" and get_task(task, family).generates
    except TaskDataError:  # a task with no data pipeline of its own (selection): no text generation either
        generates = False
    if not generates:
        raise AddDraftsError(f"{path} is a {task} bundle (family {family}); drafts, the training replies of "
                             f"speculative decoding, are for generation bundles only (tasks: "
                             f"{', '.join(generating_tasks())})")


def add_drafts(bundle: str | Path, *, data: str | Path | None = None, force: bool = False) -> AddedDrafts:
    """Rebuild a generation bundle's ``drafts/`` as training built it, and write it into the bundle atomically.

    ``data``: the training data file, when it is no longer where the bundle's ``config.yaml`` ``data.path``
    says; every other data setting (format, fields, split fractions, seed, cross-fitting fold, max_examples)
    comes from that config. ``force`` replaces an existing ``drafts/`` and accepts a data file whose sha256 is
    not the one ``metadata.json`` records (the drafts then hold that file's training replies). Raises
    ``BundleError`` (not a bundle), ``AddDraftsError`` (refused: the message says why and what is allowed),
    and what reading the data raises (``ConfigError``, ``DataError``)."""
    path = Path(bundle)
    metadata, tree = _read_bundle(path)
    source = str(path / CONFIG)
    cfg = validate_config(tree, source=source)
    _check_generates(path, metadata, cfg)

    target = path / DRAFTS_DIR
    replaced = target.exists()
    if replaced and not force:
        raise AddDraftsError(f"{path} already has drafts ({target}); give --force to replace them")

    if data is not None:
        data_path = Path(data)
        where = f"given as --data {data}"
    else:
        data_path = resolve_data_path(cfg.data.path)
        where = f"the bundle's {CONFIG} data.path {cfg.data.path!r}"
    if not data_path.is_file():
        raise AddDraftsError(f"training data file not found: {data_path.absolute()} ({where}); give the file the "
                             f"bundle was trained on with --data PATH")
    if data is not None:
        # The same config with the file's new place: an absolute path, so that a file named "sample" stays that
        # file and not the shipped corpus.
        tree = {**tree, "data": {**(tree.get("data") or {}), "path": str(data_path.absolute())}}
        cfg = validate_config(tree, source=source)

    sha = file_sha256(data_path)
    trained = metadata.get("data_sha256")
    if sha != trained:
        why = (f"the bundle was trained on a file with sha256 {trained}" if trained else
               f"the bundle's {METADATA} records no data_sha256 to check it against")
        if not force:
            raise AddDraftsError(f"{data_path} has sha256 {sha}, but {why}; drafts must be the training replies of "
                                 f"that file: give it with --data PATH, or --force to build them from this one")
        log.warning("%s has sha256 %s, but %s; building the drafts from it anyway (force)", data_path, sha, why)

    tok = bundle_tokenizer(path, metadata)
    log.info("reading the training split of %s as %s's config splits it", data_path, path)
    train, _, _, _ = load_splits(cfg)
    index = training_replies(train, tok)
    if index is None:
        raise AddDraftsError(f"{data_path}: none of the {len(train)} training examples has a reply; drafts are "
                             f"built from replies")
    with atomic_dir(target) as tmp:
        index.save(tmp)
    log.info("%s %s: %d training replies, %d trie nodes", "replaced" if replaced else "wrote", target, len(index),
             index.nodes)
    return AddedDrafts(bundle=path, folder=target, replies=len(index), nodes=index.nodes, data_path=data_path,
                       data_sha256=sha, trained_sha256=trained, replaced=replaced)
