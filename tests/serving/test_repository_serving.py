"""The model directory served for real: selection bundles (a reply pool) are hosted as selection models and
hot-swap like the others, and a watcher that ends unasked takes the replica's liveness down (gRPC health "",
the metrics port's /healthz), so an orchestrator restarts a replica that no longer follows the folder."""

from __future__ import annotations

import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.serving_fakes import ServerThread

from chatforge.client import ChatbotClient
from chatforge.config import validate_config
from chatforge.serving.repository import ModelDirectory
from chatforge.training.run import run_experiment

WAIT = 30.0


def _selector(tmp: Path, neighbours: int) -> Path:
    cfg = validate_config({
        "name": f"sel-{neighbours}", "seed": 0,
        "data": {"path": "sample", "format": "chatbot_csv", "valid_fraction": 0.1, "test_fraction": 0.1},
        "model": {"family": "retrieval", "task": "selection", "encoder": "tfidf", "neighbours": neighbours},
        "tracking": {"enabled": False},
    })
    return run_experiment(cfg, run_dir=tmp / f"run-{neighbours}").bundle_dir


@pytest.fixture(scope="module")
def selectors(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("repository-selectors")
    return _selector(tmp, 5), _selector(tmp, 0)


def _directory(tmp_path: Path, version_1: Path, kind: type[ModelDirectory] = ModelDirectory):
    """(root, directory) over root/faq/1, a copy of ``version_1``."""
    root = tmp_path / "models"
    shutil.copytree(version_1, root / "faq" / "1")
    return root, kind(root)


def test_a_selection_bundle_in_the_model_directory_answers_replies_and_hot_swaps(selectors, tmp_path):
    v1, v2 = selectors
    root, directory = _directory(tmp_path, v1)
    engine = directory.load_engine()
    assert engine.task_of("faq") == "selection" and "faq" not in engine.classifiers

    with ServerThread(engine, model_dir=directory, poll_interval=60) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert [(m.name, m.version, m.task) for m in client.list_models()] == [("faq", "1", "selection")]
            final = list(client.reply_stream("안녕하세요"))[-1]
            assert final.model == "faq" and final.model_version == "1" and final.path == "retrieval"

            shutil.copytree(v2, root / "faq" / "2")
            assert st.server.watcher.check_once() == ["faq"]
            assert [(m.name, m.version) for m in client.list_models()] == [("faq", "2")]
            final = list(client.reply_stream("안녕하세요"))[-1]
            assert final.model_version == "2" and final.path == "retrieval"


class _Fatal(BaseException):
    pass


class _Alerts:
    """Records the server's alert calls by method name (the AlertManager's surface)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.changed = threading.Event()

    def __getattr__(self, method):
        def record(*args, **kwargs):
            self.calls.append((method, args))
            self.changed.set()
        return record

    def named(self, method):
        return [args for m, args in self.calls if m == method]


class _FatalDirectory(ModelDirectory):
    """Loads the first version; any later load ends the watcher's thread (what no ``except Exception`` catches)."""

    def load(self, path, name, version):
        if version != "1":
            raise _Fatal(f"cannot load {name} {version}")
        return super().load(path, name, version)


def test_a_watcher_that_ends_takes_liveness_down_on_grpc_and_the_metrics_port(selectors, tmp_path):
    v1, _ = selectors
    root, directory = _directory(tmp_path, v1, _FatalDirectory)
    engine = directory.load_engine()
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: None  # the watcher thread's traceback is what this test provokes
    try:
        alerts = _Alerts()
        with ServerThread(engine, model_dir=directory, poll_interval=0.05, metrics_port=0, alerts=alerts,
                          http_port=0) as st:
            st.wait_serving()
            probes = [f"http://127.0.0.1:{st.server.metrics_http.port}/healthz",
                      f"http://127.0.0.1:{st.server.http.port}/healthz"]  # the metrics port and the HTTP API
            for healthz in probes:
                with urllib.request.urlopen(healthz, timeout=WAIT) as r:
                    assert r.status == 200
            with grpc.insecure_channel(st.target) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                  timeout=WAIT)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                shutil.copytree(v1, root / "faq" / "2")  # the next poll's load ends the thread
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                watch.cancel()
            assert not st.server.watcher.alive
            [(where, reason)] = alerts.named("watcher_stopped")
            assert where == str(root) and isinstance(reason, _Fatal)
            for healthz in probes:
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(healthz, timeout=WAIT)
                assert e.value.code == 503
            with ChatbotClient(st.target, timeout=WAIT) as client:  # still serving what it has until restarted
                assert list(client.reply_stream("안녕하세요"))[-1].model_version == "1"
    finally:
        threading.excepthook = previous_hook


def test_a_bad_pin_in_the_served_directory_is_alerted_once(selectors, tmp_path):
    v1, _ = selectors
    root, directory = _directory(tmp_path, v1)
    alerts = _Alerts()
    with ServerThread(directory.load_engine(), model_dir=directory, poll_interval=60, alerts=alerts) as st:
        st.wait_serving()
        (root / "faq" / "PINNED").write_text("9\n")
        for _ in range(3):
            st.server.watcher.check_once()
        [(name, message)] = alerts.named("model_directory_problem")
        assert name == "faq" and "pinned to version '9'" in message and "available: 1" in message
