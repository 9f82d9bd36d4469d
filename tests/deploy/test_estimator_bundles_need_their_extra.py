"""A server installed with ``chatforge[serve]`` alone (the serving image's default) refuses an estimator bundle (the
hybrid bot's retrieval selector, an XGBoost or linear classifier) at load, naming the packages and the extra to install
(``estimators``) and the image's build argument.

Before, the README's hybrid bot served from the default image stopped with a bare ``No module named 'sklearn'``, and
nothing said which extra held it (the training one then: MLflow, Optuna and matplotlib with it). On the old code the
first three tests fail: the error named no extra, and ``ModuleNotFoundError`` reached the caller instead of a
``BundleError``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.deploy_helpers import ESTIMATOR_MODULES, REPO, train_tiny_bundles, train_tiny_selector

from chatforge.bundle import BundleError, load_bundle

HINT = "pip install 'chatforge[estimators]' (the serving image: build it with --build-arg EXTRAS=serve,postgres,estimators)"

BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ESTIMATOR_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not installed)", name=name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CHATFORGE_LOG_FORMAT": "human"}
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def ranker(tmp_path_factory) -> Path:
    return train_tiny_selector(tmp_path_factory.mktemp("ranker"), encoder="ranker", ranker_trees=10,
                               ranker_negatives=3, ranker_neighbours=[3, 10])


def test_loading_a_selector_without_the_extra_names_the_packages_and_the_extra(ranker):
    r = _run(f"""
from chatforge.inference import load_model
try:
    load_model({str(ranker)!r}, "selector")
except Exception as e:
    print(type(e).__name__, e)
print("imported", sorted(m for m in {ESTIMATOR_MODULES!r} if m in sys.modules))
""")
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"BundleError {ranker} is a retrieval bundle (task selection) and needs scikit-learn, "
                            "scipy, xgboost-cpu, which this installation lacks"), first
    assert first.endswith(HINT), first
    assert "imported []" in r.stdout


def test_serve_refuses_to_start_with_it_and_says_what_to_install(ranker):
    """``chatforge serve`` stops at start-up (exit code 2, as for any argument it cannot use) with the same words, instead of serving
    a bot whose selector fails at its first request."""
    r = _run(f"""
sys.argv = ["chatforge", "serve", "--model", "selector={ranker}", "--port", "0", "--host", "127.0.0.1"]
from chatforge.cli import main
main()
""")
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])  # the CLI's code for bad arguments
    out = " ".join((r.stdout + r.stderr).split())  # the console wraps long lines
    assert "needs scikit-learn, scipy, xgboost-cpu, which this installation lacks" in out, out[-3000:]
    assert "chatforge[estimators]" in out and "EXTRAS=serve,postgres,estimators" in out


def test_a_package_missing_deeper_in_a_bundle_load_is_named_with_its_extra(tmp_path, monkeypatch):
    """A torch bundle whose out-of-scope detector (``binary``/``scorer`` policies) imports scikit-learn as it loads:
    the import error becomes a BundleError with the extra; any other missing module stays what it was."""
    from chatforge import bundle as bundle_mod

    chat, intent = train_tiny_bundles(tmp_path)

    def missing(name):
        def from_metadata(*args, **kwargs):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return from_metadata

    monkeypatch.setattr(bundle_mod.OOSPolicy, "from_metadata", missing("sklearn.linear_model"))
    with pytest.raises(BundleError) as e:
        load_bundle(intent)
    assert str(e.value) == f"{intent} needs scikit-learn, which this installation lacks: {HINT}"
    monkeypatch.setattr(bundle_mod.OOSPolicy, "from_metadata", missing("somethingelse"))
    with pytest.raises(ModuleNotFoundError, match="somethingelse"):
        load_bundle(intent)


def test_with_the_extra_the_same_bundle_loads(ranker):
    """The check looks for the packages without importing them; where they are installed it passes."""
    from chatforge.inference import load_model

    reply, score = load_model(ranker, "selector").select("배고파")
    assert reply and 0.0 < score <= 1.0


def test_what_the_error_tells_an_operator_to_do_is_what_the_image_and_the_guide_take():
    """The hint's build argument is one the serving Dockerfile takes and installs, and the operations guide builds the
    hybrid bot's image with it."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG EXTRAS=" in dockerfile and '".[${EXTRAS}]"' in dockerfile
    guide = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "docker build -f deploy/Dockerfile --build-arg EXTRAS=serve,postgres,estimators" in guide
    assert "EXTRAS=serve,postgres,estimators" in HINT
