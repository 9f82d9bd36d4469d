"""ONNX Runtime as a serving backend for classifiers (``chatforge serve --backend onnxruntime``).

A BERT or Transformer-encoder classification bundle is exported once at load, straight from the chatforge
torch model (``torch.onnx.export``, the TorchScript exporter, opset 17, dynamic batch and length), into a
temporary folder that is deleted as soon as ONNX Runtime has read it; with ``--precision int8`` the graph's
weights are then quantized by ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
quantized per call), as ``chatforge bench`` does for its ONNX Runtime anchor. ``fp32`` serves the export as
it is; ``auto`` is int8; ``bf16`` is refused (ONNX Runtime's CPU provider has no bf16 kernels for these
graphs, and quantize_dynamic makes int8 only). Why a temporary folder, not a cache beside the bundle: as
for CTranslate2 (serving.backend_ct2), bundles are read-only inputs whose files are hashed into the served
lineage, and the export takes seconds.

:class:`OrtClassifier` is a :class:`chatforge.inference.Classifier` whose probabilities come from an
``onnxruntime.InferenceSession``: token ids and the model's own input layout are built by the same code as
the torch path (``chatforge.bundle.class_inputs``), and ``classify``/``count_tokens``/the out-of-scope
policy are the torch classifier's, inherited, so the Classify RPC, HTTP and ListModels serve it unchanged
(metadata ``backend: onnxruntime``). The engine's classifier runner micro-batches concurrent callers
into one ``classify`` call, which runs the session once per 64 texts.

Threads: a call with one text runs on a session whose intra-op pool has one thread per CPU this process can use
less one left to the server's own threads, a batch on a second session with every CPU (``chatforge.runtime.
runner_threads``, the split torch's classify runner gets; ``OMP_NUM_THREADS`` sets both), one inter-op thread, and
neither spins: ONNX Runtime's pool spins
after each run by default, which would take the cores from the server's other work between calls.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from chatforge import runtime
from chatforge.bundle import class_inputs, load_bundle
from chatforge.fileio import private_temp_dir
from chatforge.inference import Classifier, check_precision
from chatforge.serving.backend_ct2 import BackendError, bundle_kind  # one error type for every backend

logger = logging.getLogger(__name__)

BACKEND = "onnxruntime"
FAMILIES = ("bert", "transformer")  # classifiers whose torch forward exports as it is
# --precision -> the graph served. auto: int8, ONNX Runtime's faster CPU path on the README figures.
PRECISIONS = {"fp32": "fp32", "int8": "int8", "auto": "int8"}
INSTALL_HINT = "pip install 'chatforge[ort]'"
BATCH = 64  # texts per session run (as torch_class_probs)
OPSET = 17


def import_ort():
    """``onnxruntime``, or a :class:`BackendError` saying how to install it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as e:
        raise BackendError(f"--backend onnxruntime needs the onnxruntime package ({e}); {INSTALL_HINT}") from None


def ort_precision(precision: str) -> str:
    """The graph (fp32 or int8) served for a ``--precision``; bf16 is a :class:`BackendError`."""
    check_precision(precision)
    if precision not in PRECISIONS:
        raise BackendError(f"--backend onnxruntime serves precision fp32 or int8 (auto -> int8), not {precision}: "
                           "ONNX Runtime's CPU provider has no bf16 path for these graphs; use --precision fp32 "
                           "or int8, or serve this model with --backend torch for bf16")
    return PRECISIONS[precision]


def check_available(precision: str) -> None:
    """At server start: onnxruntime and onnx importable, and the precision one this backend serves."""
    ort_precision(precision)
    import_ort()
    try:
        importlib.import_module("onnx")  # torch.onnx.export writes the graph through it
    except ImportError as e:
        raise BackendError(f"--backend onnxruntime exports through the onnx package ({e}); {INSTALL_HINT}") from None


def applies(bundle_dir: str | Path, name: str) -> bool:
    """Whether ``--backend onnxruntime`` serves this bundle: True for BERT/Transformer classifiers, False
    for bundles of other tasks (generators, selection: served by torch, logged); a classifier of another
    family (an estimator, ELMo, ByteNet) is a :class:`BackendError` (asked for, and not exportable)."""
    family, task = bundle_kind(bundle_dir, name)
    if task != "classification":
        logger.info("backend onnxruntime does not apply to %r (a %s %s bundle); serving it with torch",
                    name, family, task)
        return False
    if family not in FAMILIES:
        raise BackendError(f"model {name!r}: --backend onnxruntime serves classifiers of family "
                           f"{', '.join(FAMILIES)}; this is a classifier of family {family}; give it --backend {name}=torch")
    return True


class _Logits(torch.nn.Module):
    """The classifier's forward with positional inputs and its logits as the one output (for the exporter)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True))).logits


def export_onnx(model: torch.nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    """Write ``model`` (a chatforge torch classifier, eval mode) as an ONNX graph with dynamic batch and length."""
    names = list(example)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated and about shape arithmetic it traces; the
        # dynamic axes cover what the tracer sees (tests/serving/test_backend_ort.py checks other shapes).
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model, names), tuple(example.values()), str(path), input_names=names,
                          output_names=["logits"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}})
    return path


def quantize_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of ``src`` (weights int8, activations per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a line per tensor on the root logger at INFO and a WARNING advising shape-inference
    # pre-processing (which matters for static quantization, not for dynamic int8 weights).
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)
    return dst


def session_options(threads: int):
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    return opts


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32, copy=False)


class OrtClassifier(Classifier):
    """A classification bundle served by ONNX Runtime (see the module docstring); a TextClassifier."""

    def __init__(self, bundle_dir: str | Path, name: str, version: str = "1", precision: str = "fp32", *,
                 threads: int | None = None) -> None:
        ort = import_ort()
        graph = ort_precision(precision)
        bundle_dir = Path(bundle_dir)
        if not applies(bundle_dir, name):
            raise BackendError(f"--backend onnxruntime serves classifiers; {name!r} ({bundle_dir}) is not one")
        check_available(precision)
        bundle = load_bundle(bundle_dir)
        super().__init__(bundle, name, version)
        # One text: the CPUs available less one, left to the server's own threads; a batch: every CPU (the split
        # runtime.runner_threads gives torch's classify runner). A caller's `threads` (or OMP_NUM_THREADS) sets both.
        one, many = (threads, threads) if threads else (runtime.runner_threads("classification") or
                                                        (runtime.serving_threads(),) * 2)
        self.threads, self.batch_threads = one, many
        model = bundle.model.eval()
        example = class_inputs(model, self.tok, ["a", "b c"], self.max_input_tokens)
        t0 = time.perf_counter()
        with private_temp_dir("chatforge-ort-") as tmp:  # named by pid: a killed server's leftover is removed
            path = export_onnx(model, example, Path(tmp) / "model.onnx")
            if graph == "int8":
                path = quantize_int8(path, Path(tmp) / "model-int8.onnx")
            self.session = ort.InferenceSession(str(path), session_options(one), providers=["CPUExecutionProvider"])
            # A second session over the same graph for batches (its own copy of the weights: a few MB here).
            self.batch_session = self.session if many == one else ort.InferenceSession(
                str(path), session_options(many), providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - t0
        # ONNX Runtime holds its own copy of the weights; the module stays only for its input layout
        # (prepare_inputs reads the special ids and max_len), so its tensors go to the meta device.
        model.to("meta")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.precision = graph
        self.info.metadata.update({"backend": BACKEND, "precision": graph,
                                   "ort_threads": str(one) if many == one else f"{one} for one text, {many} for a batch"})
        logger.info("model %r served by ONNX Runtime %s (%s, %d intra-op threads for one text, %d for a batch; "
                    "exported in %.1f s)", name, ort.__version__, graph, one, many, seconds,
                    extra={"model": name, "backend": BACKEND, "precision": graph})

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, C) probabilities, columns in ``self.labels`` order (the torch path's inputs, ORT's logits)."""
        out = []
        session = self.session if len(texts) <= 1 else self.batch_session
        for i in range(0, len(texts), BATCH):
            feed = class_inputs(self.model, self.tok, list(texts[i : i + BATCH]), self.max_input_tokens)
            logits = session.run(None, {n: feed[n].numpy() for n in self.input_names})[0]
            out.append(softmax(logits.astype(np.float32, copy=False)))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)
