"""GPT's scripted decoding step (chatforge.models.gpt.scripted): the logits of the eager step, bit for bit, through
prefill, decoding steps, speculative verification and the batch's joins and leaves; each kernel a PackedLinear may
pick (one-row transposed, oneDNN, F.linear); which models it refuses and why; that it stays out of the module tree;
and how serving turns it on (``CHATFORGE_DECODE_STEP``). The served batcher's replies, scenario by scenario, are in
tests/serving/test_scripted_step_parity.py; its speed in benchmarks/served_generation.py --eager-step."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from chatforge.models.gpt import GPTConfig, GPTLMHeadModel, GPTStepModel
from chatforge.models.gpt.scripted import DECODE_STEP_ENV, decode_step_mode, scriptable
from chatforge.modules.linear import PackPolicy, onednn_linear_available, pack_linear_layers
from chatforge.registry import SpecialIds

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=4, sep=5, mask=6)
VOCAB = 50


def lm(variant: str = "gpt2", seed: int = 0, n_positions: int = 64, vocab: int = VOCAB, activation: str | None = None,
       vocab_rows: int | None = None):
    torch.manual_seed(seed)
    cfg = GPTConfig(d_model=32, n_heads=2, n_layers=2, n_positions=n_positions, dropout=0.0, attn_dropout=0.0,
                    init_std=0.3, variant=variant, activation=activation, vocab_rows=vocab_rows)
    return GPTLMHeadModel(cfg, vocab, SPECIAL, "generation").eval()


# Every kernel a PackedLinear chooses, on a model this small: one row on the transposed copy (layers with at least as
# many outputs as inputs), oneDNN from 2 rows (least = 64 x 32 multiply-adds / outputs), F.linear past 4 rows.
TINY_POLICY = PackPolicy(min_weights=0, min_macs=2 * 32 * 32, max_rows=4, name="tiny", one_row_transposed=True)


def int8(m: nn.Module, activations: str = "7-bit") -> nn.Module:
    """``m`` quantized as ``load_model(precision="int8")`` does: its linear layers dynamically quantized per channel,
    with torch's 7-bit activations or chatforge's full-range ones (``full_range_activations``, forced here)."""
    from torch.ao.quantization import quantize_dynamic

    from chatforge.inference import _int8_plan, full_range_activations

    q = quantize_dynamic(m, _int8_plan(m)[0], dtype=torch.qint8)
    if activations == "full":
        assert full_range_activations(q, {"avx512_vnni"}) > 0
    return q


def pair(packed: bool, quantized: str | None = None, **kw) -> tuple[GPTStepModel, GPTStepModel]:
    """(eager, scripted) step models over two copies of the same weights; ``quantized``: int8 with "7-bit" or "full"
    activations."""
    models = []
    for scripted in (False, True):
        m = lm(**kw)
        if packed:
            assert pack_linear_layers(m, policy=TINY_POLICY) > 0
        if quantized:
            m = int8(m, quantized)
        if scripted:
            assert m.use_scripted_step() is None
        models.append(GPTStepModel(m))
    return models[0], models[1]


def transcript(step: GPTStepModel) -> list[torch.Tensor]:
    """Every logits tensor of a fixed schedule: two rows prefilled (padded), three steps, a verified draft with rows
    keeping different numbers of tokens, a third row joining (wider prompt), two steps, a row leaving, a step; one row
    alone throughout on a second state (one-row calls: the transposed kernel)."""
    out = []
    with torch.inference_mode():
        state, logits = step.prefill([[7, 8, 9], [10, 11, 12, 13, 14, 15]], bos_id=1)
        out.append(logits)
        for _ in range(3):
            logits = step.step(state, logits.argmax(-1))
            out.append(logits)
        draft = torch.stack([logits.argmax(-1), torch.tensor([20, 21]), torch.tensor([22, 23]), torch.tensor([24, 25])], 1)
        verified = step.verify(state, draft)
        out.append(verified)
        step.accept(state, [3, 1], 4)
        logits = step.step(state, verified[:, 0].argmax(-1))
        out.append(logits)
        state_b, logits_b = step.prefill([[30, 31, 32, 33, 34, 35, 36, 37, 38, 39]], bos_id=1)
        out.append(logits_b)
        state = step.merge(state, state_b)
        logits = torch.cat([logits, logits_b])
        for _ in range(2):
            logits = step.step(state, logits.argmax(-1))
            out.append(logits)
        state = step.select(state, torch.tensor([0, 2]))
        out.append(step.step(state, logits[[0, 2]].argmax(-1)))
        alone, logits = step.prefill([[40, 41]], bos_id=1)
        out.append(logits)
        for _ in range(20):  # past the cache's first capacity: the buffers grow under the scripted step
            logits = step.step(alone, logits.argmax(-1))
            out.append(logits)
    return out


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
@pytest.mark.parametrize("packed", [False, True], ids=["nn.Linear", "PackedLinear"])
def test_the_scripted_step_gives_the_eager_logits_bit_for_bit(variant, packed):
    if packed and not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op")
    eager, scripted = pair(packed, variant=variant)
    a, b = transcript(eager), transcript(scripted)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"logits {i} differ by up to {float((x - y).abs().max())}"
    # The schedule has logits that differ from each other, and the scripted step was the one that ran.
    assert not torch.equal(a[1], a[2])
    assert scripted.model._scripted_step is not None and eager.model._scripted_step is None


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
@pytest.mark.parametrize("activations", ["7-bit", "full"])
def test_int8_models_are_scripted_too_bit_for_bit(variant, activations):
    """Dynamically quantized layers run the op their own forward calls (``quantized::linear_dynamic`` on the packed
    weights, with the layer's reduce_range): the eager int8 logits, bit for bit, through the same schedule (its
    prefill in two passes, as int8 models prefill)."""
    eager, scripted = pair(False, quantized=activations, variant=variant)
    assert not eager._one_pass and not scripted._one_pass
    a, b = transcript(eager), transcript(scripted)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"logits {i} differ by up to {float((x - y).abs().max())}"
    assert scripted.model._scripted_step is not None


def test_a_padded_vocabulary_is_cut_as_the_eager_head_cuts_it():
    eager, scripted = pair(False, vocab=45, vocab_rows=48)  # a checkpoint's padded vocabulary
    assert eager.model.lm_head.out_features > 45
    for x, y in zip(transcript(eager), transcript(scripted), strict=True):
        assert x.size(-1) == y.size(-1) == 45 and torch.equal(x, y)


def test_relu_models_are_scripted_too():
    eager, scripted = pair(False, activation="relu")
    for x, y in zip(transcript(eager), transcript(scripted), strict=True):
        assert torch.equal(x, y)


def test_the_scripted_step_is_not_part_of_the_module_tree():
    m = lm()
    keys = set(m.state_dict())
    n_params = sum(1 for _ in m.parameters())
    assert m.use_scripted_step() is None
    assert set(m.state_dict()) == keys and sum(1 for _ in m.parameters()) == n_params
    assert all(not isinstance(mod, torch.jit.ScriptModule) for mod in m.modules())
    assert m.use_scripted_step(False) is None and m._scripted_step is None


def test_models_it_cannot_script_say_why_and_decode_eagerly():
    from torch.ao.quantization import quantize_dynamic

    fp16 = quantize_dynamic(lm(), {nn.Linear}, dtype=torch.float16)
    assert scriptable(fp16) == "its dynamically quantized layers are not int8"
    assert fp16.use_scripted_step() is not None and fp16._scripted_step is None
    assert scriptable(lm().to(torch.bfloat16)) == "its weights are not fp32 on the CPU"
    training = lm().train()
    assert scriptable(training) == "in training mode"
    assert scriptable(nn.Linear(2, 2)) == "not a GPT language model"


def test_autocast_and_training_mode_fall_back_to_the_eager_step():
    eager, scripted = pair(False)
    m = scripted.model
    with torch.inference_mode():
        state, _ = scripted.prefill([[7, 8, 9]], bos_id=1)
        tokens = torch.tensor([[5]])
        pos = state.next_pos[:, None]
        width = len(state.caches[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.scripted_logits(tokens, pos, None, state.caches) is None
        m.train()
        assert m.scripted_logits(tokens, pos, None, state.caches) is None
        m.eval()
        assert len(state.caches[0]) == width  # nothing was written when it declined
        assert m.scripted_logits(tokens, pos, None, state.caches) is not None
        assert len(state.caches[0]) == width + 1


def test_decode_step_mode_is_checked_at_the_edge():
    assert decode_step_mode({}) == "auto"
    assert decode_step_mode({DECODE_STEP_ENV: " EAGER "}) == "eager"
    with pytest.raises(ValueError, match=r"CHATFORGE_DECODE_STEP='compiled' is not supported; allowed: auto, eager"):
        decode_step_mode({DECODE_STEP_ENV: "compiled"})


def _gpt_bundle(tmp_path):
    from chatforge.bench.cases import sample_texts
    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(sample_texts(), vocab_size=600, on_vocab_too_large="lower")
    cfg = validate_config({"name": "scripted", "data": {"path": "x"}, "tracking": {"enabled": False},
                           "model": {"family": "gpt", "task": "generation", "d_model": 32, "n_heads": 2, "n_layers": 2,
                                     "n_positions": 64}}, source="test")
    torch.manual_seed(0)
    return save_bundle(tmp_path / "bundle", model=build_from_config(cfg, tok, None).eval(), tokenizer=tok, config=cfg,
                       labels=None)


def test_serving_loads_fp32_gpt_generators_with_the_scripted_step_unless_told_eager(tmp_path, monkeypatch, caplog):
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model

    bundle = _gpt_bundle(tmp_path)
    monkeypatch.delenv(DECODE_STEP_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="chatforge.inference"):
        scripted = load_model(bundle, "chat")
    assert scripted.bundle.model._scripted_step is not None
    assert any("decoding steps of chat: one TorchScript call each" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(DECODE_STEP_ENV, "eager")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chatforge.inference"):
        eager = load_model(bundle, "chat")
    assert eager.bundle.model._scripted_step is None
    assert any(f"no scripted step: {DECODE_STEP_ENV}=eager" in r.getMessage() for r in caplog.records)
    # A value it does not know stops the load (and so the server's start) with what is allowed.
    monkeypatch.setenv(DECODE_STEP_ENV, "fast")
    with pytest.raises(ValueError, match="CHATFORGE_DECODE_STEP='fast' is not supported; allowed: auto, eager"):
        load_model(bundle, "chat")
    # The same greedy reply either way.
    o = GenerationOptions(max_new_tokens=12)
    assert [d.token_id for d in scripted.stream("안녕하세요", o)] == [d.token_id for d in eager.stream("안녕하세요", o)]
    # int8 too (its layers quantized first, then scripted); bf16 decodes eagerly and the log says why.
    monkeypatch.delenv(DECODE_STEP_ENV)
    int8_scripted = load_model(bundle, "chat", precision="int8")
    assert int8_scripted.bundle.model._scripted_step is not None
    monkeypatch.setenv(DECODE_STEP_ENV, "eager")
    int8_eager = load_model(bundle, "chat", precision="int8")
    assert int8_eager.bundle.model._scripted_step is None
    assert [d.token_id for d in int8_scripted.stream("안녕하세요", o)] == \
        [d.token_id for d in int8_eager.stream("안녕하세요", o)]
    monkeypatch.delenv(DECODE_STEP_ENV)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chatforge.inference"):
        assert load_model(bundle, "chat", precision="bf16").bundle.model._scripted_step is None
    assert any("no scripted step: its weights are not fp32 on the CPU" in r.getMessage() for r in caplog.records)


def test_threads_sharing_one_scripted_step_each_get_the_eager_logits():
    """The batcher and the per-request threads (beam search, the fallback runner) may run one model's scripted step at
    once; TorchScript's executor setting is per thread, and each thread's caches are its own."""
    import threading

    eager, scripted = pair(False)
    want = transcript(eager)
    got: dict[int, list[torch.Tensor]] = {}

    def run(i: int) -> None:
        got[i] = transcript(scripted)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == [0, 1, 2]
    for out in got.values():
        assert all(torch.equal(x, y) for x, y in zip(want, out, strict=True))


def test_a_torch_that_cannot_compile_the_step_serves_it_eagerly(tmp_path, monkeypatch, caplog):
    """A torch build without oneDNN's linear op (named in the graph) or a TorchScript change must not keep a bundle from
    loading: the model decodes eagerly and the log says why."""
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model
    def refuses(module):
        raise RuntimeError("Unknown builtin op: mkldnn::_linear_pointwise.\nHere are some suggestions: ...")

    m = lm()
    monkeypatch.setattr(torch.jit, "script", refuses)
    why = m.use_scripted_step()
    assert why == ("TorchScript could not compile its step (RuntimeError: Unknown builtin op: "
                   "mkldnn::_linear_pointwise.)")
    assert m._scripted_step is None
    bundle = _gpt_bundle(tmp_path)
    monkeypatch.delenv(DECODE_STEP_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="chatforge.inference"):
        gen = load_model(bundle, "chat")
    assert gen.bundle.model._scripted_step is None
    assert any("eager (no scripted step: TorchScript could not compile its step" in r.getMessage()
               for r in caplog.records)
    assert [d.token_id for d in gen.stream("안녕하세요", GenerationOptions(max_new_tokens=4))]
