"""Fakes implementing chatforge.inference's protocols, and an in-process server harness.

Used by tests/serving/, tests/client/ and tests/scenarios/ (imported as
``tests.serving_fakes``; the lead owns conftest.py). No torch, no bundles: these make the serving
layers testable on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from chatforge.decoding import GenerationOptions
from chatforge.inference import ClassPrediction, ModelInfo, TokenDelta

TESTS_DIR = Path(__file__).resolve().parent
WAIT = 10.0  # upper bound for every wait in these tests (never reached when things work)


class FakeGenerator:
    """Yields fixed tokens one by one (ids 100, 101, ...), honouring max_new_tokens."""

    def __init__(self, name: str = "echo", tokens=("Hel", "lo", " there", "!"), max_input_tokens: int = 32):
        self.info = ModelInfo(name=name, family="fake", task="generation", metadata={"seed": 7})
        self.tokens = list(tokens)
        self.max_input_tokens = max_input_tokens
        self.calls: list[tuple[str, GenerationOptions]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        self.calls.append((text, options))
        for i, tok in enumerate(self.tokens[: options.max_new_tokens]):
            yield TokenDelta(token_id=100 + i, text=tok)


class LockstepGenerator(FakeGenerator):
    """Yields token i only after the test has acknowledged receiving token i-1.

    If the server buffered tokens instead of streaming them, the test would never see
    token 0 before the end, never acknowledge it, and this generator raises.
    """

    def __init__(self, n: int = 5, **kw):
        super().__init__(tokens=[f"t{i} " for i in range(n)], **kw)
        self.acks = [threading.Event() for _ in range(n)]

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        for i, tok in enumerate(self.tokens[: options.max_new_tokens]):
            if i > 0 and not self.acks[i - 1].wait(WAIT):
                raise RuntimeError(f"token {i - 1} was not received by the client: the reply is buffered")
            yield TokenDelta(token_id=100 + i, text=tok)


class BlockingGenerator(FakeGenerator):
    """Yields one token, blocks until ``release``, then yields tokens until the engine stops it.

    ``closed`` is set when the engine closes the generator; ``produced`` counts tokens.
    """

    LIMIT = 100_000

    def __init__(self, **kw):
        super().__init__(**kw)
        self.first_sent = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()
        self.produced = 0

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        try:
            self.produced += 1
            self.first_sent.set()
            yield TokenDelta(token_id=100, text="first")
            self.release.wait(WAIT)
            while self.produced < self.LIMIT:
                self.produced += 1
                yield TokenDelta(token_id=101, text=".")
        finally:
            self.closed.set()


class FailingGenerator(FakeGenerator):
    """Yields one token, then fails with an error whose text must not reach clients."""

    SECRET = "secret-internal-detail /opt/weights"

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        yield TokenDelta(token_id=100, text="partial")
        raise RuntimeError(self.SECRET)


class FakeClassifier:
    def __init__(self, name: str = "intents", labels=("greet", "bye", "oos")):
        self.info = ModelInfo(name=name, family="fake", task="classification")
        self.labels = list(labels)
        self.max_input_tokens = 32

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def classify(self, texts: list[str]) -> list[ClassPrediction]:
        out = []
        for t in texts:
            label = "bye" if "bye" in t else "greet"
            scores = {lab: (0.8 if lab == label else 0.1) for lab in self.labels}
            out.append(ClassPrediction(label=label, score=0.8, scores=scores, out_of_scope=False))
        return out


class FakeSelector:
    """A response selector (``inference.ReplySelector``'s interface): picks ``reply`` at ``score`` for any message;
    familiar with Korean text (familiarity -3), not with anything else (-11); records what it was asked to select."""

    def __init__(self, name: str = "selector", reply: str = "맑아요.", score: float = 0.95, version: str = "3"):
        self.info = ModelInfo(name=name, family="retrieval", task="selection", version=version)
        self.name, self.version = name, version
        self.reply, self.score = reply, score
        self.selected: list[str] = []

    def familiarity(self, text: str) -> float:
        return -3.0 if any("\uac00" <= c <= "\ud7a3" for c in text) else -11.0

    def select(self, text: str) -> tuple[str, float]:
        self.selected.append(text)
        return self.reply, self.score


class TinySeq2SeqGenerator:
    """A real (tiny, random) TransformerSeq2Seq behind the ReplyGenerator protocol + step_spec.

    Characters map to ids 4..43; a token's text is ``<id>``. Random weights rarely emit </s>,
    so replies usually run to max_new_tokens, which makes join/leave timing predictable.
    """

    def __init__(self, name: str = "tiny", seed: int = 0, max_len: int = 64, d_model: int = 32, drafts=None):
        import torch

        from chatforge.models.transformer import TransformerConfig, TransformerSeq2Seq

        torch.manual_seed(seed)
        cfg = TransformerConfig(d_model=d_model, n_heads=2, num_encoder_layers=2, num_decoder_layers=2, d_ff=2 * d_model,
                                dropout=0.0, max_len=max_len)
        self.model = TransformerSeq2Seq(cfg, vocab_size=48, pad_id=0).eval()
        self.info = ModelInfo(name=name, family="transformer", task="generation", metadata={"tiny": True})
        self.max_input_tokens = 32
        self.drafts = drafts  # chatforge.drafts.DraftIndex for speculative decoding, as a bundle's

    @staticmethod
    def encode(text: str) -> list[int]:
        return [4 + (ord(c) % 40) for c in text]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def reference(self, text: str, options: GenerationOptions) -> list[int]:
        """What decoding this request alone gives (chatforge.decoding)."""
        from chatforge.decoding import generate

        return generate(self.model, self.encode(text), options, bos_id=1, eos_id=2)

    def stream(self, text: str, options: GenerationOptions) -> Iterator[TokenDelta]:
        for t in self.reference(text, options):
            yield TokenDelta(token_id=t, text=f"<{t}>")

    def step_spec(self):
        from chatforge.decoding import StepSpec
        from chatforge.models.transformer import Seq2SeqStepModel

        return StepSpec(model=Seq2SeqStepModel(self.model), encode=self.encode, new_detokenizer=_TagDetok,
                        bos_id=1, eos_id=2, unk_id=3, drafts=self.drafts)


class TinyGPTGenerator(TinySeq2SeqGenerator):
    """A real (tiny, random) GPT language model (``generation``: ``<s> q [SEP]`` then the reply) behind the
    same protocol, driven by :class:`chatforge.models.gpt.GPTStepModel` in a continuous batch. A wide init
    makes its next-token choices diverse; ``n_positions`` small enough that long requests run out of room."""

    def __init__(self, name: str = "tiny-gpt", seed: int = 0, n_positions: int = 40, d_model: int = 32,
                 drafts=None):
        import torch

        from chatforge.models.gpt import GPTConfig, GPTLMHeadModel
        from chatforge.tokenizer import SpecialIds

        torch.manual_seed(seed)
        cfg = GPTConfig(d_model=d_model, n_heads=2, n_layers=2, n_positions=n_positions, dropout=0.0,
                        attn_dropout=0.0, init_std=0.3)
        self.model = GPTLMHeadModel(cfg, 48, SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=44, sep=45),
                                    "generation").eval()
        self.info = ModelInfo(name=name, family="gpt", task="generation", metadata={"tiny": True})
        self.max_input_tokens = 32
        self.drafts = drafts

    def step_spec(self):
        from chatforge.decoding import StepSpec
        from chatforge.models.gpt import GPTStepModel

        return StepSpec(model=GPTStepModel(self.model), encode=self.encode, new_detokenizer=_TagDetok,
                        bos_id=1, eos_id=2, unk_id=3, drafts=self.drafts)


class SlowStepTinySeq2Seq(TinySeq2SeqGenerator):
    """TinySeq2SeqGenerator whose decoding steps take ``step_seconds`` longer, like a real model's
    step under load: the time stands for a long native kernel (the sleep, like one, releases the GIL),
    so a drain that does not wait for the scheduler thread finds it mid-step at interpreter exit."""

    def __init__(self, step_seconds: float = 0.2, **kw):
        super().__init__(**kw)
        self.step_seconds = step_seconds

    def step_spec(self):
        import time

        spec = super().step_spec()
        inner, pause = spec.model, self.step_seconds

        class Slow:
            max_len = inner.max_len

            def __getattr__(self, name):
                return getattr(inner, name)

            def step(self, state, tokens):
                time.sleep(pause)  # compute time of a bigger model, not synchronisation
                return inner.step(state, tokens)

        spec.model = Slow()
        return spec


class _TagDetok:
    def feed(self, token_id: int) -> str:
        return f"<{token_id}>"


class GatedStepModel:
    """A fake StepModel: token = step number + 10, never </s>; each decode step (not the
    prefill) waits for ``gate`` (a Semaphore the test releases), so a test controls steps."""

    max_len = None

    def __init__(self, gate: threading.Semaphore | None = None, vocab: int = 64):
        self.gate, self.vocab = gate, vocab
        self.step_calls = 0

    def _logits(self, n: int, token: int):
        import torch

        logits = torch.zeros(n, self.vocab)
        logits[:, token % self.vocab] = 1.0
        return logits

    def prefill(self, prompts, bos_id):
        import torch

        return {"n": len(prompts), "pos": torch.ones(len(prompts), dtype=torch.long)}, self._logits(len(prompts), 10)

    def step(self, state, tokens):
        if self.gate is not None and not self.gate.acquire(timeout=WAIT):
            raise RuntimeError("the test never released this step")
        self.step_calls += 1
        logits = self._logits(tokens.size(0), 0)
        for i, t in enumerate(tokens.tolist()):
            logits[i].zero_()
            logits[i, (t + 1) % self.vocab] = 1.0
        return logits

    def merge(self, a, b):
        import torch

        return {"n": a["n"] + b["n"], "pos": torch.cat([a["pos"], b["pos"]])}

    def select(self, state, index):
        return {"n": len(index), "pos": state["pos"][index]}


class GatedGenerator(FakeGenerator):
    """A generator whose step_spec is a :class:`GatedStepModel` (continuous batching path)."""

    def __init__(self, name: str = "gated", gate: threading.Semaphore | None = None, **kw):
        super().__init__(name=name, **kw)
        self.step_model = GatedStepModel(gate)

    def step_spec(self):
        from chatforge.serving.batching import StepSpec

        return StepSpec(model=self.step_model, encode=lambda t: [5] * len(t.split()), new_detokenizer=_TagDetok,
                        bos_id=1, eos_id=2, unk_id=3)


def make_engine(**kw):
    """A small engine: generators "echo" (default) and "lockstep"-free fakes, classifier "intents"."""
    from chatforge.serving.engine import Engine

    generators = kw.pop("generators", None) or {"echo": FakeGenerator("echo"), "other": FakeGenerator("other")}
    classifiers = kw.pop("classifiers", None)
    if classifiers is None:
        classifiers = {"intents": FakeClassifier()}
    kw.setdefault("max_input_chars", 200)
    return Engine(generators, classifiers, **kw)


class ServerThread:
    """Runs a ChatbotServer on its own event loop in a background thread (127.0.0.1, port 0).

    ``with ServerThread(engine_or_loader) as st:`` -> ``st.target`` is "127.0.0.1:PORT" once the
    port is bound (models may still be loading). Leaving the block shuts the server down.
    """

    def __init__(self, engine_or_loader, *, grace: float = 0.5, **kw):
        from chatforge.serving.server import ChatbotServer

        self._make = lambda: ChatbotServer(engine_or_loader, "127.0.0.1", 0, grace=grace, **kw)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.server = self._make()
            try:
                await self.server.start()
            finally:
                self._bound.set()
            await self.server.wait()

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by __enter__/stop
            self._error = e
            self._bound.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._bound.wait(WAIT), "server did not bind in time"
        if self._error is not None:
            raise self._error
        return self

    def run(self, coro, timeout: float = WAIT):
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_serving(self, timeout: float = WAIT) -> None:
        self.run(self.server.wait_until_serving(), timeout)

    def request_shutdown(self) -> None:
        """What SIGTERM does, from another thread."""
        self.loop.call_soon_threadsafe(self.server.request_shutdown)

    def join(self, timeout: float = WAIT) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "server thread did not stop in time"

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive() and self.loop is not None and not self.loop.is_closed():
            try:
                self.request_shutdown()
            except RuntimeError:  # loop closed meanwhile
                pass
        self.join()


# Entry point for the SIGTERM test: `python tests/serving_fakes.py PORT_FILE` serves a fake engine
# and prints the bound port once SERVING.
def _child_main(port_file: str) -> None:
    import logging

    from chatforge.serving.server import serve

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    async def main():
        ready = asyncio.Event()

        async def announce():
            await ready.wait()
            sys.stdout.write(Path(port_file).read_text().strip() + "\n")
            sys.stdout.flush()

        task = asyncio.get_running_loop().create_task(announce())
        await serve(make_engine(), "127.0.0.1", 0, grace=1.0, port_file=port_file, ready_event=ready)
        task.cancel()

    asyncio.run(main())


def _drain_child_main(port_file: str, store_url: str, grace: str) -> None:
    """`python tests/serving_fakes.py PORT_FILE drain STORE_URL GRACE`: a tiny real torch model
    (continuous batching in a native-heavy scheduler thread) with a conversation store, for the
    SIGTERM-with-streams-past-the-grace test (tests/scenarios/test_drain.py)."""
    import logging

    from chatforge.serving.engine import Engine
    from chatforge.serving.server import serve
    from chatforge.serving.store import ConversationStore

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    store = ConversationStore(store_url)

    async def main():
        ready = asyncio.Event()

        async def announce():
            await ready.wait()
            sys.stdout.write(Path(port_file).read_text().strip() + "\n")
            sys.stdout.flush()

        task = asyncio.get_running_loop().create_task(announce())
        engine = Engine({"tiny": SlowStepTinySeq2Seq(max_len=1100)}, {}, max_running=8, max_new_tokens=1024)
        await serve(engine, "127.0.0.1", 0, grace=float(grace), port_file=port_file, ready_event=ready,
                    store=store)
        task.cancel()

    try:
        asyncio.run(main())
    finally:
        store.close()
    # What is still running as the interpreter starts to finalise (the test asserts: nothing of ours).
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive())
    sys.stderr.write(f"threads at exit: {alive}\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "drain":
        _drain_child_main(sys.argv[1], sys.argv[3], sys.argv[4])
    else:
        _child_main(sys.argv[1])


def watched_directory(root, loader, **watcher_kwargs):
    """(engine, watcher) over the model directory at ``root``, loaded with ``loader``; the watcher is not started
    (tests drive ``check_once``), and its other callbacks come from ``watcher_kwargs``."""
    from chatforge.serving.repository import ModelDirectory, ModelDirectoryWatcher

    directory = ModelDirectory(root)
    engine = directory.load_engine(loader=loader)
    return engine, ModelDirectoryWatcher(engine, directory, poll_interval=60, loader=loader, **watcher_kwargs)


NOBODY = 65534


@contextlib.contextmanager
def as_another_user():
    """Run the body as uid/gid nobody when root (file access is checked against the effective ids); as the current
    user otherwise. Yields the uid the body runs as."""
    if os.geteuid() != 0:
        yield os.geteuid()
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield NOBODY
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def json_log_lines(level: int):
    """Capture chatforge's log records as the JSON lines the server writes; yields a function returning them
    parsed (a list of dicts), the logger's level set to ``level`` meanwhile."""
    import io
    import json
    import logging

    from chatforge.serving.observability import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("chatforge")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
