"""Hot swap with real bundles: continuous requests while version 2 appears; none fails and
replies switch to version 2.

Two tiny Transformer bundles are trained on the shipped sample corpus (different seeds),
laid out as ``DIR/chat/1`` and ``DIR/chat/2``, and served by a ChatbotServer with the model
directory and its watcher (the same wiring as ``chatforge serve --model-dir DIR``). Version 2
appears atomically (written under a hidden name, then renamed) while clients keep calling.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from tests.serving_fakes import ServerThread

from chatforge.client import ChatbotClient
from chatforge.config import validate_config
from chatforge.serving.repository import ModelDirectory
from chatforge.training.run import run_experiment

pytestmark = pytest.mark.slow

WAIT = 30.0  # bound for every wait here; real (tiny) models on a shared 2-core machine
POLL = 0.2  # the watcher's poll interval: the swap happens within a fraction of a second


def _train(tmp: Path, seed: int) -> Path:
    tree = {
        "name": f"hotswap-{seed}",
        "seed": seed,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2, "d_ff": 64,
                  "dropout": 0.0, "num_encoder_layers": 1, "num_decoder_layers": 1},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "lr": 1e-3, "max_source_len": 24,
                  "max_target_len": 24},
        "output": {"dir": str(tmp / "runs")},
        "tracking": {"enabled": False},  # MLflow's database setup would dominate a 4-step run
    }
    return run_experiment(validate_config(tree), run_dir=tmp / f"run-{seed}").bundle_dir


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("hotswap-real")
    return _train(tmp, 1), _train(tmp, 2)


def test_hot_swap_real_bundles_under_continuous_requests(bundles, tmp_path):
    v1, v2 = bundles
    root = tmp_path / "models"
    shutil.copytree(v1, root / "chat" / "1")
    directory = ModelDirectory(root)
    engine = directory.load_engine()
    finals = []  # the final chunk of every successful reply, in completion order
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    flowing = threading.Event()
    switched = threading.Event()

    with ServerThread(engine, model_dir=directory, poll_interval=POLL) as st:
        st.wait_serving()
        assert st.server.watcher is not None  # the server runs the directory watcher itself
        with ChatbotClient(st.target, timeout=WAIT) as client:
            assert [(m.name, m.version) for m in client.list_models()] == [("chat", "1")]

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        chunks = list(client.reply_stream("안녕하세요", max_new_tokens=4))
                    except BaseException as e:  # noqa: BLE001 - recorded and asserted below
                        with lock:
                            errors.append(e)
                        continue
                    final = chunks[-1]
                    with lock:
                        finals.append(final)
                        if len(finals) >= 10:
                            flowing.set()
                        if sum(f.model_version == "2" for f in finals) >= 10:
                            switched.set()

            threads = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                assert flowing.wait(WAIT), f"no traffic on version 1: {errors[:3]}"
                # A new version appears atomically: copied under a hidden name (ignored by the
                # directory), then renamed into place.
                shutil.copytree(v2, root / "chat" / ".incoming-2")
                os.replace(root / "chat" / ".incoming-2", root / "chat" / "2")
                assert switched.wait(WAIT), "replies never switched to version 2"
            finally:
                stop.set()
                for t in threads:
                    t.join(WAIT)
            assert not any(t.is_alive() for t in threads)

            models = client.list_models()
            last = list(client.reply_stream("hello", max_new_tokens=2))[-1]

    assert not errors, f"{len(errors)} requests failed during the swap, e.g. {errors[:3]}"
    versions = [f.model_version for f in finals]
    first_new = versions.index("2")
    assert set(versions[:first_new]) == {"1"} and first_new >= 10
    # Once version 2 answers, version 1 may only finish the replies it had already started.
    assert versions[first_new:].count("1") <= len(threads)
    assert all(f.finish_reason in ("stop", "length") and f.model == "chat" for f in finals)
    assert [(m.name, m.version) for m in models] == [("chat", "2")]
    assert Path(models[0].metadata["bundle"]) == root / "chat" / "2"  # the new bundle's lineage
    assert last.model_version == "2"
    assert st.server.watcher.swaps == 1
