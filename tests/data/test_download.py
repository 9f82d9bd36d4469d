from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chatforge.data import (
    DATASETS,
    DataError,
    DatasetFile,
    DatasetSpec,
    DownloadError,
    download,
    read_examples,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "chatbot_kr" / "ChatbotData.csv").is_file() or not (SHARED / "clinc150").is_dir(),
    reason=f"real data not present under {SHARED}",
)

PAYLOAD = b"Q,A,label\nhi,hello,greeting\n" * 5000  # ~140 KB: several 64 KiB chunks


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a temp folder; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def tiny_spec(url: str, sha256: str | None) -> DatasetSpec:
    return DatasetSpec(
        name="tiny", folder="tiny", description="test", license="Apache-2.0",
        files=(DatasetFile(name="tiny.csv", url=url, sha256=sha256),),
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- registry --------------------------------------------------------------------------------


def test_registry_entries():
    assert set(DATASETS) >= {"chatbot-kr", "clinc150"}
    chatbot = DATASETS["chatbot-kr"].files[0]
    assert chatbot.url.startswith("https://") and "4cf20d13" in chatbot.url
    assert chatbot.sha256 == "287eb129695b577321c80ad397bb3c2279164d4ca577874d129fd3db5b30afe2"
    clinc = {f.name: f for f in DATASETS["clinc150"].files}
    assert clinc["data_full.json"].sha256 is None  # upstream hash unknown (see download.py)
    assert dict(clinc["data_full.json"].substitutes)["data_full_trainval.json"].startswith("89c77f87")
    assert all("828f8093" in f.url for f in clinc.values())


def test_unknown_dataset_lists_known(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'imdb'; known datasets: chatbot-kr, clinc150"):
        download("imdb", tmp_path)


# --- copying from a local folder --------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("source", [SHARED, SHARED / "chatbot_kr"])
def test_from_shared_folder(tmp_path, source):
    folder = download("chatbot-kr", tmp_path / "data", from_path=source)
    assert folder == tmp_path / "data" / "chatbot_kr"
    assert leftovers(folder) == ["ChatbotData.csv"]
    examples, _ = read_examples(folder / "ChatbotData.csv")
    assert len(examples) == 11_823


@needs_shared
def test_clinc_from_shared_uses_verified_substitute(tmp_path):
    folder = download("clinc150", tmp_path, from_path=SHARED)
    assert leftovers(folder) == ["all_wiki_sents.txt", "data_full_trainval.json"]
    examples, _ = read_examples(folder / "data_full_trainval.json", clinc_keys=("val",))
    assert len(examples) == 3_000


@needs_shared
def test_tampered_copy_fails_and_leaves_nothing(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(SHARED / "chatbot_kr", source)
    target = source / "ChatbotData.csv"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes().replace("땡".encode(), "뗑".encode(), 1))
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as info:
        download("chatbot-kr", dest, from_path=source)
    message = str(info.value)
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    assert f"expected {DATASETS['chatbot-kr'].files[0].sha256}" in message and f"got {actual}" in message
    assert str(target) in message
    assert leftovers(dest / "chatbot_kr") == []  # no partial or temp file


@needs_shared
def test_existing_good_file_is_skipped_and_bad_one_replaced(tmp_path, monkeypatch):
    folder = download("chatbot-kr", tmp_path, from_path=SHARED)
    good = folder / "ChatbotData.csv"
    stamp = good.stat().st_mtime_ns
    download("chatbot-kr", tmp_path, from_path=SHARED)
    assert good.stat().st_mtime_ns == stamp
    good.write_bytes(b"corrupt")
    download("chatbot-kr", tmp_path, from_path=SHARED)
    assert hashlib.sha256(good.read_bytes()).hexdigest() == DATASETS["chatbot-kr"].files[0].sha256


def test_from_path_missing_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"has none of ChatbotData\.csv"):
        download("chatbot-kr", tmp_path / "d", from_path=empty)
    with pytest.raises(DataError, match=r"is not a folder"):
        download("chatbot-kr", tmp_path / "d", from_path=tmp_path / "missing")
    assert not (tmp_path / "d").exists()  # a failed download leaves no empty folders behind
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(DataError):
        download("chatbot-kr", kept, from_path=empty)
    assert kept.is_dir() and list(kept.iterdir()) == []  # a folder that was there stays


# --- over HTTP (a local server; no internet) --------------------------------------------------


def test_http_download_verifies_and_reports_progress(tmp_path, http_root, monkeypatch):
    root, base = http_root
    (root / "tiny.csv").write_bytes(PAYLOAD)
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(f"{base}/tiny.csv", hashlib.sha256(PAYLOAD).hexdigest()))
    calls: list[tuple[int, int | None]] = []
    folder = download("tiny", tmp_path / "dest", progress=lambda done, total: calls.append((done, total)))
    assert (folder / "tiny.csv").read_bytes() == PAYLOAD
    assert leftovers(folder) == ["tiny.csv"]
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(calls) > 1
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_http_hash_mismatch_names_url_and_hashes(tmp_path, http_root, monkeypatch):
    root, base = http_root
    (root / "tiny.csv").write_bytes(PAYLOAD)
    url = f"{base}/tiny.csv"
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(url, "0" * 64))
    with pytest.raises(DownloadError) as info:
        download("tiny", tmp_path / "dest")
    message = str(info.value)
    assert url in message and f"expected {'0' * 64}" in message
    assert f"got {hashlib.sha256(PAYLOAD).hexdigest()}" in message
    assert leftovers(tmp_path / "dest" / "tiny") == []


@needs_shared
def test_real_spec_over_local_http(tmp_path, http_root, monkeypatch):
    root, base = http_root
    shutil.copy(SHARED / "chatbot_kr" / "ChatbotData.csv", root / "ChatbotData.csv")
    spec = DATASETS["chatbot-kr"]
    local = dataclasses.replace(spec.files[0], url=f"{base}/ChatbotData.csv")
    monkeypatch.setitem(DATASETS, "chatbot-kr", dataclasses.replace(spec, files=(local,)))
    folder = download("chatbot-kr", tmp_path)
    assert hashlib.sha256((folder / "ChatbotData.csv").read_bytes()).hexdigest() == spec.files[0].sha256


def test_http_unknown_hash_is_saved(tmp_path, http_root, monkeypatch):
    root, base = http_root
    (root / "tiny.csv").write_bytes(PAYLOAD)
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(f"{base}/tiny.csv", None))
    folder = download("tiny", tmp_path)
    assert (folder / "tiny.csv").read_bytes() == PAYLOAD


def test_http_errors(tmp_path, http_root, monkeypatch):
    _, base = http_root
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(f"{base}/absent.csv", "0" * 64))
    with pytest.raises(DownloadError, match=rf"could not download {base}/absent\.csv: HTTP Error 404"):
        download("tiny", tmp_path)
    assert leftovers(tmp_path / "tiny") == []
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec("file:///etc/passwd", None))
    with pytest.raises(DownloadError, match=r"only https \(and http\) URLs are allowed"):
        download("tiny", tmp_path)
