"""CTranslate2 as a serving backend for GPT and Transformer bundles (``chatforge serve --backend ctranslate2``).

A bundle is exported once at load and served by CTranslate2 whose ``compute_type`` follows ``--precision``
(fp32 -> float32, int8 -> int8, bf16 -> bfloat16 where this CPU's CTranslate2 build has it, auto -> int8),
from float32 weights written into a temporary folder that is deleted as soon as CTranslate2 has read it:

* a GPT generation/lm bundle: ``to-hf`` (``GPT2LMHeadModel``) -> CTranslate2's ``TransformersConverter`` ->
  a ``ctranslate2.Generator``; the model's input is the prompt (``<s> q [SEP]`` for generation), the reply
  continues it;
* a Transformer encoder-decoder generation bundle (post-LN, the paper's and chatforge's default): ``to-hf``
  (``MarianMTModel``) -> :func:`chatforge.interop.hf_transformer.to_ct2` -> a ``ctranslate2.Translator``;
  the prompt's ids are the encoder's source, built as chatforge's own ``Seq2SeqGenerator.encode_prompt``
  builds them (earlier turns included where the bundle was trained with ``data.context_turns``), and the
  decoder starts from ``<s>``. A pre-LN bundle (``norm_first: true``) has no Marian equivalent and is refused
  at load, naming ``--backend NAME=torch`` with the model's name.

:class:`CT2Generator` implements the :class:`chatforge.inference.ReplyGenerator` protocol for both (the
difference between the two is one small adapter, :class:`_GPTModel` or :class:`_Seq2SeqModel`), so the
engine, gRPC/HTTP services, cancellation, deadlines and the conversation store drive it as any other
generator.

Why a temporary folder, not a cache beside the bundle: bundles are inputs the server only reads (they may
be read-only mounts, and their files are hashed into the served lineage); the conversion of the models
chatforge trains takes seconds, and a cache would need invalidation on every change of the bundle or of
CTranslate2's format.

Batching. CTranslate2 cannot add a sequence to a running batch, so the engine's continuous batcher (which
needs a step-wise model) does not apply: the engine hosts this generator with :class:`CT2Runner` (its
``make_runner``), which admits requests within the engine's limits and hands them to the generator, whose
per-step callback sends each token straight to the request's event loop. Requests are gathered into
``generate_batch`` (GPT) or ``translate_batch`` (Transformer) calls run by CTranslate2's workers
(``inter_threads``): requests that arrive within ``batch_wait_ms`` of each other start together, and a
request that arrives while a batch runs joins it by a restart: the running batch is stopped after its
current step (the per-step ``callback`` returns True for every row) and its unfinished rows go on, in the
next batch with the newcomers, from the tokens they have produced: a GPT row from its prompt plus those
tokens, a Transformer row from the same source with those tokens as the ``target_prefix`` (one prefill of
those tokens again; greedy replies are unchanged, tests/serving/test_backend_ct2*.py). A
``translate_batch`` callback also reports the target prefix's tokens, step by step; they are not sent
again. A request's tokens are streamed through the callback; a request that goes away stops its row there
while the others go on. (``generate_tokens`` is this same callback loop over one batch whose inputs are
all given at the call, so requests arriving one by one could not share it.) What is lost against
continuous batching: each join costs a prefill of every running row's prompt and reply so far (continuous
batching prefills only the newcomer), and rows share a batch only with identical decoding settings
(sampling parameters, beams, and the tokens min_new_tokens still requires), so a request with other
settings waits for a free worker. Beam search runs without a callback (CTranslate2 streams greedy and
sampled decoding only): its reply arrives at the end, as chatforge's own beam search sends it, and a
cancelled beam request stops only when its search ends.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge import runtime
from chatforge.bundle import load_bundle
from chatforge.decoding import GenerationOptions
from chatforge.fileio import private_temp_dir
from chatforge.inference import ModelInfo, TokenDelta, check_precision
from chatforge.serving.batching import GenRequest, RunnerClosedError, _log, _Runner

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "ctranslate2", "onnxruntime")  # onnxruntime: classifiers (serving.backend_ort)
# --precision -> CTranslate2 compute_type. auto: int8, CTranslate2's fastest CPU type on the figures in the
# README (Serving backends); bf16 only where this CPU's build lists bfloat16 (get_supported_compute_types).
COMPUTE_TYPES = {"fp32": "float32", "int8": "int8", "bf16": "bfloat16", "auto": "int8"}
INSTALL_HINT = "pip install 'chatforge[ct2]'"
DEFAULT_BATCH_WAIT_MS = 2.0


class BackendError(ValueError):
    """A backend that cannot serve this bundle here (missing library, unsupported family or precision)."""


class UnsupportedOptionError(ValueError):
    """A generation option CTranslate2 cannot honour as chatforge defines it (the engine: INVALID_ARGUMENT)."""


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
    return backend


def import_ct2():
    """``ctranslate2``, or a :class:`BackendError` saying how to install it."""
    try:
        return importlib.import_module("ctranslate2")
    except ImportError as e:
        raise BackendError(f"--backend ctranslate2 needs the ctranslate2 package ({e}); {INSTALL_HINT}") from None


def compute_type_for(precision: str, supported: set[str] | None = None) -> str:
    """The CTranslate2 compute_type for a serving precision, checked against this CPU's ``supported`` set."""
    check_precision(precision)
    ct = COMPUTE_TYPES[precision]
    if supported is None:
        supported = set(import_ct2().get_supported_compute_types("cpu"))
    if ct not in supported:
        allowed = ", ".join(p for p, c in COMPUTE_TYPES.items() if c in supported)
        raise BackendError(f"precision {precision} needs CTranslate2 compute_type {ct}, which this CPU's "
                           f"CTranslate2 does not support (it has: {', '.join(sorted(supported))}); "
                           f"allowed with --backend ctranslate2 here: {allowed}")
    return ct


# CTranslate2 compute_type (as a loaded model reports it) -> the serving precision it is: the weights' type decides,
# the activations' (int8_float32, int8_bfloat16, ...) do not change what --precision would name it.
_PRECISION_OF_COMPUTE_TYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8",
                              "int8_float32": "int8", "int8_bfloat16": "int8", "int8_float16": "int8",
                              "int16": "int16"}


def served_precision(compute_type: str) -> str:
    """The precision a model loaded with ``compute_type`` (CTranslate2's own name) is served at: ``fp32``, ``bf16``,
    ``int8``; an unknown name as it is, never a requested ``auto``."""
    return _PRECISION_OF_COMPUTE_TYPE.get(compute_type, compute_type)


def thread_split(cpus: int) -> tuple[int, int]:
    """(inter_threads, intra_threads) for ``cpus`` available CPUs: one Generator worker per 4 CPUs (at
    most 4), each with an equal share of OpenMP threads. One worker runs a whole batch on every core (what
    CTranslate2 called directly does); more workers let a second batch start while one runs, once there
    are enough cores that splitting them still leaves each batch several."""
    inter = max(1, min(4, cpus // 4))
    return inter, max(1, cpus // inter)


def _token_name(i: int) -> str:
    return f"<id{i}>"


def _token_id(name: str) -> int:
    return int(name[3:-1])  # "<id{i}>" -> i


def _id_vocabulary(hf: Path, cfg: dict, unk_id: int) -> None:
    """Replace the exported folder's tokenizer files by a word-level tokenizer whose token ``i`` is
    ``<id{i}>`` (CTranslate2 takes token strings), so any bundle tokenizer (SentencePiece, byte, Hugging
    Face) maps ids to strings exactly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    for p in hf.iterdir():  # the bundle's own tokenizer files
        if p.name not in ("config.json", "generation_config.json") and not p.name.startswith("model"):
            p.unlink()
    vocab = {_token_name(i): i for i in range(cfg["vocab_size"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=_token_name(unk_id)))
    names = {k: _token_name(cfg[f"{k}_token_id"]) for k in ("bos", "eos", "pad") if cfg.get(f"{k}_token_id") is not None}
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=_token_name(unk_id),
                            **{f"{k}_token": v for k, v in names.items()}).save_pretrained(str(hf))


def convert_bundle(bundle_dir: Path, out_dir: Path, unk_id: int = 0, name: str = "NAME") -> Path:
    """Write a CTranslate2 float32 copy of a GPT bundle (a ``Generator``) or of a Transformer generation
    bundle (a ``Translator``) to ``out_dir`` (created; must not exist), with the ``<id{i}>`` vocabulary
    (:func:`_id_vocabulary`; ``unk_id``: the bundle tokenizer's unknown id). ``name``: the served model's
    name, for the errors."""
    import_ct2()
    try:
        importlib.import_module("tokenizers")
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise BackendError(f"--backend ctranslate2 converts through transformers ({e}); {INSTALL_HINT}") from None
    from chatforge.interop import ConversionError, to_hf

    work = out_dir.parent / f".{out_dir.name}-hf"
    family, _ = bundle_kind(bundle_dir, name)
    try:
        # The Marian export leaves its tokenizer out (it would warn that a SentencePiece file cannot be read by
        # AutoTokenizer); both get the id vocabulary below.
        hf = to_hf(bundle_dir, work, **({"tokenizer": False} if family == "transformer" else {}))
    except ConversionError as e:
        raise BackendError(f"model {name!r} ({bundle_dir}) cannot be served by CTranslate2: {e}; serve it with "
                           f"--backend torch (--backend {name}=torch for this model alone)") from None
    import json

    cfg = json.loads((hf / "config.json").read_text())
    if cfg.get("model_type") not in ("gpt2", "marian"):
        raise BackendError(f"bundle {bundle_dir} exports as {cfg.get('model_type')!r}; CTranslate2's converters "
                           "here read GPT-2 (variant gpt2) and the Transformer's Marian export only; serve it "
                           "with --backend torch")
    _id_vocabulary(hf, cfg, unk_id)
    transformers.utils.logging.disable_progress_bar()  # no bars in server logs
    if cfg["model_type"] == "marian":
        from chatforge.interop.hf_transformer import to_ct2

        return to_ct2(hf, out_dir, "float32")
    from ctranslate2.converters import TransformersConverter

    return Path(TransformersConverter(str(hf)).convert(str(out_dir), quantization="float32", force=True))


class _GPTModel:
    """A GPT bundle on a ``ctranslate2.Generator``: the model's input is the prompt (``<s> q [SEP]``), and
    after a restart the prompt plus the reply so far; the per-step callback reports new tokens only."""

    ct2_class = "Generator"
    echoes_prefix = False

    def __init__(self, model: Any) -> None:
        # The model's input for a request around the message's ids (<s> q [SEP] for generation, as is for lm).
        marker = -1
        wrapped = model.prompt_ids([marker])
        at = wrapped.index(marker)
        self._prefix, self._suffix = wrapped[:at], wrapped[at + 1:]
        self.n_positions = int(model.cfg.n_positions)
        # A padded vocabulary (model.vocab_rows: more embedding rows than tokenizer ids) is converted whole; its
        # rows past the tokenizer stand for no token, so CTranslate2 is told never to produce them.
        rows = int(getattr(model.cfg, "vocab_rows", None) or model.vocab_size)
        self.suppress = [[_token_name(i)] for i in range(int(model.vocab_size), rows)]

    def inputs(self, ids: list[int]) -> tuple[list[int], int]:
        """(the model's input ids, the most tokens the model can add to them)."""
        prompt = [*self._prefix, *ids, *self._suffix]
        # As chatforge's GPT: positions 0 .. n_positions-1; the last token generated is never fed back.
        limit = self.n_positions - len(prompt) + 1
        if limit < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's n_positions is {self.n_positions}")
        return prompt, limit

    @staticmethod
    def min_key(job: _Job) -> int:
        return max(0, job.options.min_new_tokens - job.produced)

    @staticmethod
    def lengths(batch: list[_Job]) -> dict[str, int]:
        # Counted from the end of each row's input (its prompt and reply so far): the tokens still allowed.
        most = max(j.left for j in batch)
        return dict(max_length=most, min_length=min(_GPTModel.min_key(batch[0]), most))  # equal: part of the key

    def decode(self, ct2_model: Any, batch: list[_Job], **kw: Any) -> list[list[int]]:
        if self.suppress:
            kw["suppress_sequences"] = self.suppress
        results = ct2_model.generate_batch([j.prompt + [_token_name(t) for t in j.tokens] for j in batch],
                                           include_prompt_in_result=False, **kw)
        return [r.sequences_ids[0] for r in results]


class _Seq2SeqModel:
    """A Transformer generation bundle on a ``ctranslate2.Translator``: the source is the prompt's ids as
    chatforge's ``Seq2SeqGenerator`` feeds its encoder (no <s> or </s> added), the decoder starts from
    ``<s>`` (the export's ``decoder_start_token``), and after a restart the reply so far is the
    ``target_prefix``. CTranslate2 counts the lengths with the prefix and reports its tokens to the callback."""

    ct2_class = "Translator"
    echoes_prefix = True

    def __init__(self, model: Any) -> None:
        self.max_len = int(model.max_len)

    def inputs(self, ids: list[int]) -> tuple[list[int], int]:
        if len(ids) > self.max_len:  # as TransformerSeq2Seq.init_state
            raise ValueError(f"input has {len(ids)} tokens; the model's max_len is {self.max_len}")
        # As chatforge's decoding: at most max_len steps, from <s> at position 0.
        return ids, self.max_len

    @staticmethod
    def min_key(job: _Job) -> int:
        # Absolute (the target prefix counts): rows share a batch only while each still needs the same total.
        return job.options.min_new_tokens if job.produced < job.options.min_new_tokens else 0

    @staticmethod
    def lengths(batch: list[_Job]) -> dict[str, int]:
        most = max(j.limit for j in batch)
        return dict(max_decoding_length=most, min_decoding_length=min(_Seq2SeqModel.min_key(batch[0]), most),
                    max_input_length=0)  # inputs were checked against max_len above

    @staticmethod
    def decode(ct2_model: Any, batch: list[_Job], **kw: Any) -> list[list[int]]:
        prefixes = [[_token_name(t) for t in j.tokens] for j in batch]
        results = ct2_model.translate_batch([j.prompt for j in batch],
                                            target_prefix=prefixes if any(prefixes) else None, **kw)
        return [[_token_id(t) for t in r.hypotheses[0]] for r in results]


# (family, task) -> how CTranslate2 serves it
MODELS: dict[tuple[str, str], Any] = {("gpt", "generation"): _GPTModel, ("gpt", "lm"): _GPTModel,
                                      ("transformer", "generation"): _Seq2SeqModel}

_END = object()


@dataclass(eq=False)
class _Job:
    prompt: list[str]  # the model's input (GPT: the prompt; Transformer: the source), as token names
    options: GenerationOptions
    limit: int  # most tokens this request may produce
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)  # the reply so far (a restart continues from it)
    finished: bool = False
    skip: int = 0  # callback steps of the batch now running that replay the reply so far (Translator)
    sink: Any = None  # called with each item instead of queueing it (CT2Runner: straight to the event loop)
    stop_error: BaseException | None = None  # set to end the row with this error (the runner is closing)

    def put(self, item: Any) -> None:
        (self.sink or self.out.put)(item)

    @property
    def produced(self) -> int:
        return len(self.tokens)

    @property
    def left(self) -> int:
        return self.limit - self.produced


class CT2Generator:
    """A GPT or Transformer generation bundle served by CTranslate2 (see the module docstring); a ReplyGenerator.

    ``generator`` is the ``ctranslate2.Generator`` (GPT) or ``ctranslate2.Translator`` (Transformer);
    ``steps_run`` counts the tokens CTranslate2 produced for every request (cancellation tests read it).
    """

    def __init__(self, bundle_dir: str | Path, name: str, version: str = "1", precision: str = "fp32", *,
                 inter_threads: int | None = None, intra_threads: int | None = None,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, max_batch_size: int = 64,
                 join_running: bool = True) -> None:
        ct2 = import_ct2()
        compute_type = compute_type_for(precision)
        bundle_dir = Path(bundle_dir)
        bundle = load_bundle(bundle_dir)
        adapter = MODELS.get((bundle.family, bundle.task))
        if adapter is None:
            raise BackendError(f"--backend ctranslate2 serves GPT generation/lm and Transformer generation bundles; "
                               f"{name!r} is a {bundle.family} {bundle.task} bundle (serve it with --backend torch)")
        self.adapter = adapter(bundle.model)
        self.tok = bundle.tokenizer
        self.max_input_tokens = bundle.config.train.max_source_len
        self.context_turns = bundle.config.data.context_turns
        cpus = runtime.serving_threads()  # the CPUs available less one for the server's own threads
        auto_inter, auto_intra = thread_split(cpus)
        self.inter_threads = inter_threads or auto_inter
        self.intra_threads = intra_threads or (auto_intra if inter_threads is None else
                                               max(1, cpus // self.inter_threads))
        t0 = time.perf_counter()
        with private_temp_dir("chatforge-ct2-") as tmp:  # named by pid: a killed server's leftover is removed
            path = convert_bundle(bundle_dir, Path(tmp) / "ct2", unk_id=self.tok.unk_id, name=name)
            self.generator = getattr(ct2, self.adapter.ct2_class)(
                str(path), device="cpu", compute_type=compute_type, inter_threads=self.inter_threads,
                intra_threads=self.intra_threads)
        seconds = time.perf_counter() - t0
        del bundle.model  # CTranslate2 holds its own copy of the weights
        self.eos_id = self.tok.eos_id
        # What the loaded model computes in, as CTranslate2 resolved it (int8 may become int8_float32), and the
        # precision that is: ListModels reports these, never the requested "auto".
        self.compute_type = str(getattr(self.generator, "compute_type", None) or compute_type)
        resolved = served_precision(self.compute_type)
        self.info = ModelInfo(name=name, family=bundle.family, task=bundle.task, version=version, metadata={
            **bundle.metadata, "context_turns": str(self.context_turns), "backend": "ctranslate2",
            "precision": resolved, **({"precision_requested": precision} if precision != resolved else {}),
            "compute_type": self.compute_type, "ct2_threads": f"{self.inter_threads}x{self.intra_threads}"})
        logger.info("model %r served by CTranslate2 %s %s (%s, %d worker(s) x %d threads; converted in %.1f s)",
                    name, ct2.__version__, self.adapter.ct2_class, self.compute_type, self.inter_threads,
                    self.intra_threads, seconds, extra={"model": name, "backend": "ctranslate2",
                                                        "compute_type": self.compute_type})
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_batch_size = max_batch_size
        self.join_running = join_running
        self._steps = [0]  # steps_run's count, a list the step callback can update without holding self
        self.batches_run = 0
        self.restarts = 0
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._free = self.inter_threads
        self._pool = ThreadPoolExecutor(max_workers=self.inter_threads, thread_name_prefix=f"chatforge-ct2-{name}")

    @property
    def steps_run(self) -> int:
        return self._steps[0]

    @steps_run.setter
    def steps_run(self, value: int) -> None:
        self._steps[0] = value

    # ------------------------------------------------------------------ ReplyGenerator

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def encode_prompt(self, text: str, context: Sequence[str] = ()) -> tuple[list[int], int]:
        """As :meth:`chatforge.inference.Seq2SeqGenerator.encode_prompt`: the latest whole turns that fit."""
        return self.tok.encode_with_context(text, context, max_turns=self.context_turns,
                                            budget=self.max_input_tokens)

    def check_options(self, options: GenerationOptions) -> GenerationOptions:
        """Refuse what CTranslate2 cannot do as chatforge defines it (:class:`UnsupportedOptionError`)."""
        if options.do_sample and options.seed is not None:
            raise UnsupportedOptionError(
                f"options.seed={options.seed!r} is not supported by the ctranslate2 backend: its sampling "
                "generator is one per process (ctranslate2.set_random_seed), not one per request; allowed: "
                "no seed (or serve this model with --backend torch)")
        if options.repetition_penalty != 1.0:
            raise UnsupportedOptionError(
                f"options.repetition_penalty={options.repetition_penalty!r} is not supported by the ctranslate2 "
                "backend: CTranslate2 also penalizes the prompt's tokens, chatforge only the reply's; allowed: 1")
        if options.no_repeat_ngram_size:
            raise UnsupportedOptionError(
                f"options.no_repeat_ngram_size={options.no_repeat_ngram_size!r} is not supported by the "
                "ctranslate2 backend: CTranslate2 also counts the prompt's n-grams, chatforge only the reply's; "
                "allowed: 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(options, name) != 0.0:
                raise UnsupportedOptionError(
                    f"options.{name}={getattr(options, name)!r} is not supported by the ctranslate2 backend: "
                    "CTranslate2 has no such penalty; allowed: 0 (or serve this model with --backend torch)")
        return options

    def stream(self, text: str, options: GenerationOptions, context: Sequence[str] = ()) -> Iterator[TokenDelta]:
        return self._consume(self._job(text, options, context))

    def _job(self, text: str, options: GenerationOptions, context: Sequence[str] = (), **kw: Any) -> _Job:
        options.validate()
        self.check_options(options)
        ids = self.encode_prompt(text, context)[0][: self.max_input_tokens] or [self.tok.unk_id]
        prompt, limit = self.adapter.inputs(ids)
        return _Job([_token_name(i) for i in prompt], options, min(options.max_new_tokens, limit), **kw)

    def _key(self, job: _Job) -> tuple:
        """Requests with equal keys can share a batch (CTranslate2's decoding settings are per batch)."""
        o = job.options
        sampling = (o.temperature, o.top_k, o.top_p) if o.do_sample else ()
        return (o.do_sample, sampling, o.repetition_penalty, o.no_repeat_ngram_size, self.adapter.min_key(job),
                o.num_beams, o.length_penalty if o.num_beams > 1 else None)

    def make_runner(self, name: str, **kw: Any) -> CT2Runner:
        """The engine's runner for this model (``Engine._make_slot``): :class:`CT2Runner`."""
        return CT2Runner(name, self, **kw)

    def _consume(self, job: _Job) -> Iterator[TokenDelta]:
        self._submit(job)
        detok = self.tok.incremental_decoder()
        try:
            while True:
                item = job.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield TokenDelta(token_id=item, text=detok.feed(item))
        finally:
            # Closed early (cancel, deadline) or done: the batch's callback stops this row at its next token.
            job.cancelled.set()

    # ------------------------------------------------------------------ request-level batching

    def _submit(self, job: _Job) -> None:
        with self._cond:
            self._pending.append(job)
            self._cond.notify_all()
            self._start_locked()

    def _start_locked(self) -> None:
        while self._free > 0 and self._pending:
            self._free -= 1
            self._pool.submit(self._worker)

    def _take_batch(self) -> list[_Job]:
        with self._cond:
            # Requests that arrive together (8 streams opened at once) share the batch: wait up to batch_wait
            # after the first for more, as the classify micro-batcher does.
            deadline = time.perf_counter() + self.batch_wait
            while len(self._pending) < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0 or not self._cond.wait(left):
                    break
            gone = [j for j in self._pending if j.cancelled.is_set()]
            self._pending = [j for j in self._pending if not j.cancelled.is_set()]
            batch: list[_Job] = []
            if self._pending:
                key = self._key(self._pending[0])
                batch = [j for j in self._pending if self._key(j) == key][: self.max_batch_size]
                self._pending = [j for j in self._pending if j not in batch]
        for j in gone:  # cancelled while waiting: ended without running (the runner counts it dropped)
            j.finished = True
            j.put(_END)
        return batch

    def _worker(self) -> None:
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    return
                again: list[_Job] = []
                try:
                    again = self._run(batch)
                except BaseException as e:  # noqa: BLE001 - every request of the batch gets the error
                    logger.error("CTranslate2 failed while generating", exc_info=True)
                    for j in batch:
                        if not j.finished:
                            j.finished = True
                            j.put(e)
                finally:
                    if again:  # stopped so that waiting requests join: first in line for the next batch
                        with self._cond:
                            self._pending[:0] = again
                    for j in batch:
                        if not j.finished and j not in again:
                            j.finished = True
                            j.put(_END)
        finally:
            with self._cond:
                self._free += 1
                self._start_locked()
                self._cond.notify_all()

    def _joinable(self, batch: list[_Job]) -> bool:
        """Whether a waiting request could share the next batch with this one's unfinished rows."""
        with self._cond:
            if not self._pending:
                return False
            running = [j for j in batch if not j.finished]
            keys = {self._key(j) for j in running}
            fits = len(running) + len(self._pending) <= self.max_batch_size
            return fits and any(self._key(p) in keys and not p.cancelled.is_set() for p in self._pending)

    def _run(self, batch: list[_Job]) -> list[_Job]:
        """Run one CTranslate2 batch; returns the rows stopped early to take waiting requests in."""
        o = batch[0].options
        # min_new_tokens past the position limit: as chatforge's decoding, the reply ends at the limit.
        kw: dict[str, Any] = dict(end_token=[self.eos_id], **self.adapter.lengths(batch))
        if o.do_sample:
            kw.update(sampling_topk=o.top_k, sampling_topp=o.top_p, sampling_temperature=o.temperature)
        else:
            kw.update(sampling_topk=1)
        self.batches_run += 1
        for j in batch:
            j.skip = j.produced if self.adapter.echoes_prefix else 0
        if o.num_beams > 1:
            replies = self.adapter.decode(self.generator, batch, beam_size=o.num_beams,
                                          length_penalty=o.length_penalty, **kw)
            for j, reply in zip(batch, replies, strict=True):
                for tok in reply[: j.limit]:
                    if tok == self.eos_id:
                        break
                    self.steps_run += 1
                    j.tokens.append(tok)
                    j.put(tok)
            return []
        restart = False
        steps = self._steps
        # The callback holds no reference to this object: CTranslate2 may drop its copy of the callback on its own
        # worker thread after the batch, and were that the last reference, this object and its Generator would be
        # freed there, whose destructor joins that very thread (std::system_error "Resource deadlock avoided":
        # the process aborts; seen in CI, and a hot swap that unloads a model can leave exactly that last reference).
        eos_id, join_running, me = self.eos_id, self.join_running, weakref.ref(self)

        def on_step(step) -> bool:
            nonlocal restart
            j = batch[step.batch_id]
            if j.finished:
                return True
            if restart:  # this row's token is dropped; it is computed again in the next batch
                return True
            if j.stop_error is not None:
                j.finished = True
                j.put(j.stop_error)
                return True
            if j.cancelled.is_set():
                j.finished = True
                j.put(_END)
                return True
            if step.step < j.skip:  # the reply so far, given again as the target prefix: already sent
                return False
            if step.token_id == eos_id:
                j.finished = True
                j.put(_END)
                return True
            steps[0] += 1
            j.tokens.append(step.token_id)
            j.put(step.token_id)
            if j.produced >= j.limit:
                j.finished = True
                j.put(_END)
                return True
            owner = me() if join_running else None  # alive: _run's caller holds it while the batch runs
            if owner is not None and owner._joinable(batch):
                # CTranslate2 cannot add a row to a running batch: stop this one, and continue its rows
                # from their input + tokens so far together with the waiting requests (one more prefill).
                restart = True
                return True
            return False

        self.adapter.decode(self.generator, batch, beam_size=1, callback=on_step, **kw)
        if not restart:
            return []
        self.restarts += 1
        return [j for j in batch if not j.finished and not j.cancelled.is_set()]

    def wait_idle(self, timeout: float) -> bool:
        """Block until no batch runs or waits (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._free == self.inter_threads and not self._pending, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def bundle_kind(bundle_dir: str | Path, name: str) -> tuple[str | None, str | None]:
    """(family, task) from a bundle's metadata.json, read before a backend loads it; a
    :class:`BackendError` naming the model when the file cannot be read."""
    import json

    meta_path = Path(bundle_dir) / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise BackendError(f"model {name!r}: cannot read {meta_path}: {e}") from None
    return meta.get("family"), meta.get("task")


def applies(bundle_dir: str | Path, name: str) -> bool:
    """Whether ``--backend ctranslate2`` serves this bundle: True for GPT generation/lm and Transformer
    generation bundles, False for bundles of other tasks (classifiers, selection: served by torch, logged);
    a generation bundle of another family is a :class:`BackendError` (asked for, and impossible). A pre-LN
    Transformer passes here and is refused at load (its config, not its metadata, says so)."""
    family, task = bundle_kind(bundle_dir, name)
    if task not in ("generation", "lm"):
        logger.info("backend ctranslate2 does not apply to %r (a %s %s bundle); serving it with torch",
                    name, family, task)
        return False
    if (family, task) not in MODELS:
        raise BackendError(f"model {name!r}: --backend ctranslate2 serves GPT and Transformer generation bundles; "
                           f"this is a {family} {task} bundle; give it --backend {name}=torch")
    return True


def parse_backends(items: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``--backend`` values -> (the default backend, {model name: backend}). Each value is a backend
    (the default for every model) or ``NAME=BACKEND``; the last default given wins."""
    default, per_model = "torch", {}
    for item in items:
        name, sep, value = item.rpartition("=")
        value = value.strip()
        if value not in BACKENDS:
            raise ValueError(f"--backend {item!r}: backend {value!r} is not supported; allowed: "
                             f"{', '.join(BACKENDS)}, or NAME=BACKEND for one model")
        if sep and not name.strip():
            raise ValueError(f"--backend {item!r}: the model name before '=' is empty; use NAME=BACKEND")
        if sep:
            per_model[name.strip()] = value
        else:
            default = value
    return default, per_model


class CT2Runner(_Runner):
    """The engine's runner for a :class:`CT2Generator`: admits requests within ``max_running``/``max_queued``
    like the others and hands each to the generator's batches, whose per-step callback sends the request's
    tokens straight to its event loop (``GenRequest.emit``, the engine's LoopSink). The per-request runner
    would instead wake one worker thread per token per stream to pass each token on.
    """

    kind = "ctranslate2"

    def __init__(self, name: str, generator: CT2Generator, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.generator = generator
        self._jobs: set[_Job] = set()

    def submit(self, req: GenRequest) -> None:
        self._enqueue(req)
        with self._cond:
            self._pump_locked()

    def _pump_locked(self) -> None:
        if self._closed:
            return
        for req in self._dequeue(lambda new, _next: self.running + len(new) < self.max_running):
            self._start(req)

    def _start(self, req: GenRequest) -> None:
        detok = self.generator.tok.incremental_decoder()
        state = {"n": 0}
        me = weakref.ref(self)  # the job (which CTranslate2's step callback reaches) must not keep the runner,
        # and through it the Generator, alive: see CT2Generator._run

        def sink(item: Any) -> None:  # on a CTranslate2 worker thread (or this one, for a failure)
            if isinstance(item, int):
                state["n"] += 1
                req.emit("token", TokenDelta(token_id=item, text=detok.feed(item)))
                return
            runner = me()
            if runner is None:  # the engine dropped this runner only after every job ended
                return
            if item is _END:
                if req.cancelled.is_set():
                    runner._end(req, job, "dropped")
                else:
                    runner._end(req, job, "completed",
                                ("end", "length" if state["n"] >= req.options.max_new_tokens else "stop"))
            else:
                runner._end(req, job, "failed", ("error", item))

        try:
            job = self.generator._job(req.text, req.options, req.turns, cancelled=req.cancelled, sink=sink)
        except BaseException as e:  # noqa: BLE001 - a bad request fails alone
            job = None
            self._end(req, job, "failed", ("error", e))
            return
        self._jobs.add(job)
        req.emit("start", req.prompt_tokens)
        self.metrics.prompt_tokens(self.name, req.prompt_tokens)
        self.generator._submit(job)

    def _end(self, req: GenRequest, job: _Job | None, outcome: str, last: tuple[str, Any] | None = None) -> None:
        req.generated = 0 if job is None else job.produced
        _log(req, logging.INFO, "generation %s", outcome, model=self.name, outcome=outcome,
             completion_tokens=req.generated)
        with self._cond:
            self._jobs.discard(job)
            self.running -= 1
            self.stats.update(running=-1, **{outcome: 1})
            self._pump_locked()
            self._cond.notify_all()
        if last is not None:  # after the counters, as the other runners: whoever sees the end sees `completed`
            req.emit(*last)

    def join(self, timeout: float) -> bool:
        return self.stats.wait_for(lambda s: self.running == 0, timeout)

    def close(self) -> None:
        super().close()
        with self._cond:
            jobs = list(self._jobs)
        for j in jobs:  # rows still running stop at their next token and tell their consumers why
            j.stop_error = RunnerClosedError("server shutting down: the reply was cut off; retry on another replica")

    def _fail_item(self, item: GenRequest, exc: BaseException) -> None:
        item.emit("error", exc)
