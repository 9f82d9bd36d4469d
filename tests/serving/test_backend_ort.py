"""``--backend onnxruntime``: a classifier bundle exported to ONNX at load and served by ONNX Runtime behind
the TextClassifier protocol.

Checked against chatforge's torch classifier on the same random weights: probabilities equal within float
rounding in fp32 (BERT and the Transformer encoder), int8 argmax agreement bounded, the bundle's out-of-scope
policy giving the same answers, batched and single calls agreeing; refusals (bf16, families that do not
export, a missing onnxruntime) at the edge; and, marked slow, a Classify call through a real
``chatforge serve --backend onnxruntime`` process over gRPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from chatforge.inference import load_model  # noqa: E402
from chatforge.oos import OOSPolicy  # noqa: E402
from chatforge.runtime import int8_dot_products  # noqa: E402
from chatforge.serving import backend_ort  # noqa: E402
from chatforge.serving.backend_ct2 import parse_backends  # noqa: E402
from chatforge.serving.backend_ort import BackendError, OrtClassifier  # noqa: E402
from chatforge.serving.engine import load_hosted_model  # noqa: E402

LABELS = ["greet", "weather", "food", "movie", "bored", "oos"]
FAMILIES = {
    # init 0.3 (BERT) / the default init (Transformer): class probabilities far from uniform, argmaxes far from ties
    "bert": {"d_model": 32, "n_heads": 2, "num_layers": 2, "d_ff": 64, "dropout": 0.0, "max_len": 40,
             "initializer_range": 0.3},
    "transformer": {"d_model": 32, "n_heads": 2, "num_encoder_layers": 2, "d_ff": 64, "dropout": 0.0},
}


def _texts() -> list[str]:
    from chatforge.bench.cases import sample_texts

    base = sample_texts()
    # varied lengths in one batch (padding), an empty text (the unk fallback), one longer than max_source_len
    return [*base[:80], "", " ".join(base[:30])]


def _bundle(out: Path, family: str, oos: OOSPolicy | None = None) -> Path:
    """A tiny classification bundle with random weights and a SentencePiece tokenizer, as ``chatforge train``
    writes them (``oos``: the out-of-scope policy stored in its metadata)."""
    from chatforge.bench.cases import sample_texts
    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(sample_texts(), vocab_size=600, on_vocab_too_large="lower")
    cfg = validate_config({"name": out.name, "data": {"path": "sample"}, "tracking": {"enabled": False},
                           "model": {"family": family, "task": "classification", **FAMILIES[family]},
                           "train": {"max_source_len": 24}}, source="test")
    torch.manual_seed(0)
    return save_bundle(out, model=build_from_config(cfg, tok, LABELS).eval(), tokenizer=tok, config=cfg,
                       labels=LABELS, extra_metadata={"oos": oos.to_metadata()} if oos else None)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request, tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("ort") / request.param, request.param)


@pytest.fixture(scope="module")
def torch_clf(bundle):
    return load_model(bundle, "intents")


def test_fp32_probabilities_match_torch(bundle, torch_clf):
    ort_clf = OrtClassifier(bundle, "intents", precision="fp32")
    texts = _texts()
    ref, got = torch_clf.predict_proba(texts), ort_clf.predict_proba(texts)
    assert got.shape == ref.shape == (len(texts), len(LABELS)) and got.dtype == np.float32
    assert ref.max(1).mean() > 0.3  # not a near-uniform model, where any output would be close
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()
    # the served predictions: same labels and per-label scores as the torch classifier's
    for a, b in zip(ort_clf.classify(texts), torch_clf.classify(texts), strict=True):
        assert a.label == b.label and a.out_of_scope == b.out_of_scope
        assert a.scores.keys() == b.scores.keys() and abs(a.score - b.score) < 2e-5
    assert ort_clf.info.metadata["backend"] == "onnxruntime" and ort_clf.info.metadata["precision"] == "fp32"
    assert ort_clf.count_tokens(texts[0]) == torch_clf.count_tokens(texts[0])


def test_int8_argmax_agreement(bundle, torch_clf):
    ort_clf = OrtClassifier(bundle, "intents", precision="int8")
    texts = _texts()
    ref, got = torch_clf.predict_proba(texts), ort_clf.predict_proba(texts)
    assert ort_clf.info.metadata["precision"] == "int8"
    assert not np.allclose(got, ref, atol=1e-6)  # the weights really are quantized: it is another graph
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    # ONNX Runtime's u8s8 kernels without VNNI add products in 16-bit lanes and lose more: on an AMD EPYC with AVX2
    # only the Transformer's probabilities moved by up to 0.153 (under 0.1 on an Intel Xeon with VNNI).
    assert np.abs(got - ref).max() < (0.1 if int8_dot_products() else 0.2)


def test_auto_is_int8_and_bf16_is_refused(bundle):
    assert backend_ort.ort_precision("auto") == "int8" and backend_ort.ort_precision("fp32") == "fp32"
    with pytest.raises(BackendError, match="serves precision fp32 or int8.*not bf16"):
        OrtClassifier(bundle, "intents", precision="bf16")
    with pytest.raises(ValueError, match="precision='fp16' is not supported"):
        backend_ort.ort_precision("fp16")


def test_the_session_leaves_a_cpu_to_the_server(bundle, monkeypatch):
    # ONNX Runtime's intra-op pool: the CPUs available less one for the server's own threads (it took them all)
    from chatforge import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda *a, **k: 3)
    clf = OrtClassifier(bundle, "intents", precision="fp32")
    assert (clf.threads, clf.batch_threads) == (2, 3) and clf.batch_session is not clf.session  # a batch: every CPU
    texts = _texts()[:5]
    np.testing.assert_allclose(clf.predict_proba(texts[:1]), clf.predict_proba(texts)[:1], atol=2e-5)  # same graph
    mine = OrtClassifier(bundle, "intents", precision="fp32", threads=3)  # a caller's choice stands, for both
    assert (mine.threads, mine.batch_threads) == (3, 3) and mine.batch_session is mine.session


def test_batch_and_single_calls_agree(bundle):
    ort_clf = OrtClassifier(bundle, "intents", precision="fp32")
    texts = _texts()  # 82 texts: two session runs of up to 64
    batched = ort_clf.predict_proba(texts)
    single = np.concatenate([ort_clf.predict_proba([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=2e-5)


def test_oos_policy_applied_as_by_the_torch_classifier(tmp_path):
    # a threshold between the model's confident and unsure answers, so both sides are exercised
    probe = load_model(_bundle(tmp_path / "probe", "bert"), "intents").predict_proba(_texts()).max(1)
    threshold = float(np.median(probe))
    policy = OOSPolicy(policy="threshold", threshold=threshold)
    path = _bundle(tmp_path / "bert", "bert", oos=policy)
    torch_clf = load_hosted_model(path, "intents")
    ort_clf = load_hosted_model(path, "intents", backend="onnxruntime")
    assert isinstance(ort_clf, OrtClassifier)
    texts = _texts()
    a, b = ort_clf.classify(texts), torch_clf.classify(texts)
    assert [p.label for p in a] == [p.label for p in b]
    assert [p.out_of_scope for p in a] == [p.out_of_scope for p in b]
    assert 0 < sum(p.out_of_scope for p in a) < len(texts)  # both outcomes occur
    assert all(p.label == "oos" for p in a if p.out_of_scope)
    # ListModels metadata: the policy Classify applies and the backend
    meta = ort_clf.info.metadata
    assert meta["oos_policy"] == "threshold" and float(meta["oos_threshold"]) == threshold
    assert meta["backend"] == "onnxruntime" and "backend" not in torch_clf.info.metadata


def _fake_bundle(path: Path, family: str, task: str) -> Path:
    path.mkdir()
    (path / "metadata.json").write_text(json.dumps({"family": family, "task": task}))
    return path


def test_families_it_cannot_export_are_refused(tmp_path):
    for family in ("xgboost", "elmo"):
        with pytest.raises(BackendError, match=rf"serves classifiers of family bert, transformer; this is a classifier "
                                               rf"of family {family}; give it --backend intents=torch"):
            backend_ort.applies(_fake_bundle(tmp_path / family, family, "classification"), "intents")
    # other tasks are served by torch
    assert backend_ort.applies(_fake_bundle(tmp_path / "gpt", "gpt", "generation"), "chat") is False
    assert backend_ort.applies(_fake_bundle(tmp_path / "bert", "bert", "classification"), "intents") is True
    with pytest.raises(BackendError, match="cannot read"):
        backend_ort.applies(tmp_path / "missing", "intents")


def test_backend_names(monkeypatch):
    assert parse_backends(["onnxruntime", "chat=torch"]) == ("onnxruntime", {"chat": "torch"})
    with pytest.raises(ValueError, match="allowed: torch, ctranslate2, onnxruntime"):
        parse_backends(["onnx"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(BackendError, match=r"needs the onnxruntime package .*pip install 'chatforge\[ort\]'"):
        backend_ort.check_available("fp32")


def test_server_config_refuses_bf16_with_onnxruntime(tmp_path):
    from chatforge.serving.server import ServerConfig

    with pytest.raises(BackendError, match="not bf16"):
        ServerConfig(bundles={"intents": tmp_path}, precision="bf16", backend="onnxruntime")
    with pytest.raises(BackendError, match="not bf16"):
        ServerConfig(bundles={"intents": tmp_path}, precision="bf16", backends={"intents": "onnxruntime"})


@pytest.mark.slow
def test_grpc_serve_classifies_through_onnxruntime(tmp_path):
    from tests.scenarios.test_e2e import wait_for_file

    from chatforge.client import ChatbotClient

    path = _bundle(tmp_path / "bert", "bert")
    torch_clf = load_model(path, "intents")
    port_file = tmp_path / "port"
    env = {**os.environ, "CHATFORGE_ENV": "test"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", "--model", f"intents={path}", "--backend", "onnxruntime",
         "--precision", "fp32", "--port", "0", "--port-file", str(port_file), "--grace", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = wait_for_file(port_file, proc, timeout=120)
        with ChatbotClient(f"127.0.0.1:{port}", timeout=30) as client:
            for text in _texts()[:5]:
                got, [ref] = client.classify(text), torch_clf.classify([text])
                assert got.label == ref.label and got.out_of_scope == ref.out_of_scope
                assert got.scores.keys() == ref.scores.keys()
                assert max(abs(got.scores[k] - ref.scores[k]) for k in ref.scores) < 1e-4
            [entry] = client.list_models()
            assert entry.metadata.get("backend") == "onnxruntime" and entry.metadata.get("precision") == "fp32"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_refuses_an_unexportable_family_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from chatforge.cli import app

    bad = _fake_bundle(tmp_path / "elmo", "elmo", "classification")
    result = CliRunner().invoke(app, ["serve", "--model", f"intents={bad}", "--backend", "onnxruntime",
                                      "--port", "0"])
    assert result.exit_code != 0
    assert "serves classifiers of family bert, transformer" in result.output
