"""Download registry: public corpora by name, fetched over HTTPS (or copied from a local folder),
verified by sha256 and written atomically.

Files land in ``dest_dir/<dataset folder>/`` (``chatbot_kr/``, ``clinc150/``), the same layout
as the shared data folder, so the path :func:`download` returns can be handed to
:func:`chatforge.data.read_examples` file by file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.data.readers import DataError
from chatforge.fileio import apply_umask

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, "int | None"], None]

CHUNK_BYTES = 1 << 16
DEFAULT_TIMEOUT_S = 30.0


class DownloadError(DataError):
    """A dataset could not be fetched, or what was fetched does not match its sha256."""


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset.

    ``sha256`` None means the upstream hash is not known to us; the file is then fetched without
    verification (and a log line says so). ``substitutes`` are ``(file name, sha256)`` pairs
    accepted instead of this file when copying from a local folder (see :func:`download`).
    """

    name: str
    url: str
    sha256: str | None
    substitutes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    description: str
    license: str
    files: tuple[DatasetFile, ...] = field(default_factory=tuple)


DATASETS: dict[str, DatasetSpec] = {
    "chatbot-kr": DatasetSpec(
        name="chatbot-kr",
        folder="chatbot_kr",
        description="11,823 Korean chit-chat question/answer pairs (songys/Chatbot_data), columns Q,A,label",
        license="MIT",
        files=(
            DatasetFile(
                name="ChatbotData.csv",
                # Only the short commit 4cf20d13 is recorded; github.com's /raw/ route resolves
                # abbreviated commit ids (raw.githubusercontent.com needs a full id or a branch).
                url="https://github.com/songys/Chatbot_data/raw/4cf20d13/ChatbotData.csv",
                sha256="287eb129695b577321c80ad397bb3c2279164d4ca577874d129fd3db5b30afe2",
            ),
        ),
    ),
    "clinc150": DatasetSpec(
        name="clinc150",
        folder="clinc150",
        description="CLINC150 intent classification with out-of-scope queries (Larson et al., EMNLP 2019)",
        license="CC BY 3.0",
        files=(
            DatasetFile(
                name="data_full.json",
                url=(
                    "https://raw.githubusercontent.com/clinc/oos-eval/"
                    "828f8093932c8fe6ca7936c3d2e52903b1c523de/data/data_full.json"
                ),
                # The sha256 we hold is of data_full_trainval.json (the upstream file without its
                # test/oos_test lists); the upstream data_full.json's hash is unknown, so it is
                # fetched unverified. Pinning the commit in the URL still fixes its content.
                sha256=None,
                substitutes=(
                    (
                        "data_full_trainval.json",
                        "89c77f8722787c36e52954fd90bb3f9f537f716801db4d604efeef32a8cdd09f",
                    ),
                ),
            ),
            DatasetFile(
                name="all_wiki_sents.txt",
                url=(
                    "https://raw.githubusercontent.com/clinc/oos-eval/"
                    "828f8093932c8fe6ca7936c3d2e52903b1c523de/data/all_wiki_sents.txt"
                ),
                sha256="570704f8120d13d27dda90d116a0b2365e121139f72c2967b65f55465ebfad44",
            ),
        ),
    ),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _already_there(target: Path, sha256: str | None) -> bool:
    if not target.is_file():
        return False
    if sha256 is None:
        logger.info("%s exists and has no known sha256; keeping it", target)
        return True
    if sha256_file(target) == sha256:
        logger.info("%s exists with the expected sha256; skipping", target)
        return True
    logger.warning("%s exists but its sha256 differs; fetching it again", target)
    return False


def _stream_to(
    target: Path,
    source,
    *,
    sha256: str | None,
    origin: str,
    total: int | None,
    progress: ProgressCallback | None,
) -> None:
    """Copy the binary stream ``source`` into ``target`` via a temp file, checking sha256.

    Nothing is left at ``target`` (or beside it) unless the whole file arrived and matched.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise DownloadError(
                f"sha256 mismatch for {origin}: expected {sha256}, got {actual}; "
                "the file was not saved (the source changed or the transfer was corrupted)"
            )
        if sha256 is None:
            logger.warning("%s has no known sha256; saved unverified (sha256 %s)", origin, actual)
        apply_umask(tmp)  # mkstemp made it 0600; the data set is read by other users too
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fetch(file: DatasetFile, target: Path, timeout: float, progress: ProgressCallback | None) -> None:
    scheme = urllib.parse.urlsplit(file.url).scheme
    if scheme not in ("https", "http"):
        raise DownloadError(f"refusing to fetch {file.url}: only https (and http) URLs are allowed")
    logger.info("downloading %s -> %s", file.url, target)
    request = urllib.request.Request(file.url, headers={"User-Agent": "chatforge"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _stream_to(target, response, sha256=file.sha256, origin=file.url, total=total, progress=progress)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
        raise DownloadError(f"could not download {file.url}: {e}") from e


def _source_folder(spec: DatasetSpec, from_path: Path) -> Path:
    if not from_path.is_dir():
        raise DataError(
            f"--from path {from_path} is not a folder; pass the data folder or the dataset's folder"
        )
    nested = from_path / spec.folder
    return nested if nested.is_dir() else from_path


def _copy(file: DatasetFile, folder: Path, dest: Path, progress: ProgressCallback | None) -> Path:
    candidates = [(file.name, file.sha256), *file.substitutes]
    for name, sha256 in candidates:  # noqa: B007 (the matching pair is used after the loop)
        source = folder / name
        if source.is_file():
            break
    else:
        raise DataError(
            f"{folder} has none of {', '.join(n for n, _ in candidates)}; pass the shared data folder "
            "or the dataset's own folder"
        )
    target = dest / name
    if _already_there(target, sha256):
        return target
    logger.info("copying %s -> %s", source, target)
    with source.open("rb") as f:
        _stream_to(
            target, f, sha256=sha256, origin=str(source), total=source.stat().st_size, progress=progress
        )
    return target


def download(
    name: str,
    dest_dir: str | os.PathLike[str],
    *,
    from_path: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Fetch dataset ``name`` into ``dest_dir/<folder>/`` and return that folder.

    With ``from_path``, files are copied from a local folder instead: either the shared data
    folder (holding ``chatbot_kr/``, ``clinc150/``) or the dataset's own folder. A file's
    ``substitutes`` are accepted there, verified by their own sha256 (e.g. the shared
    ``data_full_trainval.json`` stands in for upstream ``data_full.json``).

    Files already present with the right sha256 are skipped; every write goes to a temp file in
    the same folder and is moved into place with ``os.replace`` only after its hash matched.
    ``progress(bytes_done, bytes_total)`` is called as each file streams (total None if unknown).
    """
    spec = get_spec(name)
    folder = Path(dest_dir) / spec.folder
    # Folders this call makes: removed again (when still empty) if it fails, so a failed download leaves nothing
    made = [d for d in (folder, *folder.parents) if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        source = _source_folder(spec, Path(from_path)) if from_path is not None else None
        for file in spec.files:
            if source is not None:
                _copy(file, source, folder, progress)
                continue
            target = folder / file.name
            if not _already_there(target, file.sha256):
                _fetch(file, target, timeout, progress)
    except BaseException:
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:  # not empty (a file of this data set was written) or not ours to remove
                break
        raise
    logger.info("dataset %s ready in %s", name, folder)
    return folder
