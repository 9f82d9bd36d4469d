"""The Transformer generator's scripted prefill and decoding step (chatforge.models.transformer.scripted): the eager
logits bit for bit through the prefill (encoder and first step), steps, speculative verification, joins and leaves (post-LN and pre-LN, ReLU and GELU, tied and
untied embeddings, plain and packed linear layers); the models it refuses and why; the fallbacks; and that serving
turns it on for fp32 Transformer generators. The batcher's seeded scenarios: tests/serving/test_scripted_step_parity.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatforge.models.transformer import Seq2SeqStepModel, TransformerConfig, TransformerSeq2Seq
from chatforge.models.transformer.scripted import scriptable
from chatforge.modules.linear import PackPolicy, onednn_linear_available, pack_linear_layers

VOCAB = 40
# d_model 32: one row on the transposed copy where outputs >= inputs, oneDNN from 2 rows, F.linear past 4.
TINY_POLICY = PackPolicy(min_weights=0, min_macs=2 * 32 * 32, max_rows=4, name="tiny", one_row_transposed=True)


def seq2seq(seed: int = 0, **kw) -> TransformerSeq2Seq:
    torch.manual_seed(seed)
    cfg = TransformerConfig(d_model=32, n_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=64, dropout=0.0,
                            max_len=48, **kw)
    return TransformerSeq2Seq(cfg, vocab_size=VOCAB, pad_id=0).eval()


def pair(packed: bool, quantized: str | None = None, **kw) -> tuple[Seq2SeqStepModel, Seq2SeqStepModel]:
    """(eager, scripted) over two copies of the same weights; ``quantized``: int8 with "7-bit" or "full" activations
    (tests/models/test_gpt_scripted.int8)."""
    from tests.models.test_gpt_scripted import int8

    models = []
    for scripted in (False, True):
        m = seq2seq(**kw)
        if packed:
            assert pack_linear_layers(m, policy=TINY_POLICY) > 0
        if quantized:
            m = int8(m, quantized)
        if scripted:
            assert m.use_scripted_step() is None
        models.append(Seq2SeqStepModel(m))
    return models[0], models[1]


def transcript(step: Seq2SeqStepModel) -> list[torch.Tensor]:
    """Every logits tensor of a fixed schedule: two rows prefilled, three steps, a verified draft kept in part, a
    wider row joining, two steps, a row leaving, two steps; and one row alone for 12 steps."""
    out = []
    with torch.inference_mode():
        state, logits = step.prefill([[5, 6, 7], [8, 9, 10, 11, 12, 13]], bos_id=1)
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
        state_b, logits_b = step.prefill([[14, 15, 16, 17, 18, 19, 20, 21, 22]], bos_id=1)
        out.append(logits_b)
        state = step.merge(state, state_b)
        logits = torch.cat([logits, logits_b])
        for _ in range(2):
            logits = step.step(state, logits.argmax(-1))
            out.append(logits)
        state = step.select(state, torch.tensor([0, 2]))
        logits = logits[[0, 2]]
        for _ in range(2):
            logits = step.step(state, logits.argmax(-1))
            out.append(logits)
        alone, logits = step.prefill([[30, 31]], bos_id=1)
        for _ in range(12):
            logits = step.step(alone, logits.argmax(-1))
            out.append(logits)
    return out


@pytest.mark.parametrize("kw", [{}, {"norm_first": True}, {"activation": "gelu"}, {"tie_embeddings": False}],
                         ids=["post-LN", "pre-LN", "gelu", "untied"])
@pytest.mark.parametrize("packed", [False, True], ids=["nn.Linear", "PackedLinear"])
def test_the_scripted_step_gives_the_eager_logits_bit_for_bit(packed, kw):
    if packed and not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op")
    eager, scripted = pair(packed, **kw)
    a, b = transcript(eager), transcript(scripted)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"logits {i} differ by up to {float((x - y).abs().max())}"
    assert not torch.equal(a[1], a[2])
    assert scripted.model._scripted_step is not None and eager.model._scripted_step is None


@pytest.mark.parametrize("kw", [{}, {"norm_first": True}], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("activations", ["7-bit", "full"])
def test_int8_models_are_scripted_too_bit_for_bit(kw, activations):
    eager, scripted = pair(False, quantized=activations, **kw)
    a, b = transcript(eager), transcript(scripted)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"logits {i} differ by up to {float((x - y).abs().max())}"
    assert scripted.model._scripted_step is not None


def test_the_prefill_runs_in_the_graph_with_the_eager_state(monkeypatch):
    """The encoder and the first step come from the scripted graph (the eager ones are not called) and leave the state
    the eager prefill leaves: the encoder's output, the padding mask, every cache, bit for bit."""
    eager, scripted = pair(True if onednn_linear_available() else False, norm_first=True)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    with torch.inference_mode():
        want, want_logits = eager.prefill(prompts, bos_id=1)
        m = scripted.model
        for name in ("init_state", "decode_step", "encode"):
            monkeypatch.setattr(m, name, lambda *a, _n=name, **k: pytest.fail(f"the eager {_n} ran"))
        got, got_logits = scripted.prefill(prompts, bos_id=1)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got.memory, want.memory) and torch.equal(got.memory_mask, want.memory_mask)
    assert torch.equal(got.lens, want.lens)
    for a, b in zip(got.caches, want.caches, strict=True):
        for x, y in ((a.self_attn.k, b.self_attn.k), (a.self_attn.v, b.self_attn.v),
                     (a.cross_attn.k, b.cross_attn.k), (a.cross_attn.v, b.cross_attn.v)):
            assert x.shape == y.shape and torch.equal(x, y)


def test_a_prompt_the_eager_prefill_refuses_is_refused_the_same_way():
    _, scripted = pair(False)
    with torch.inference_mode(), pytest.raises(ValueError, match="max_len is 48"):
        scripted.prefill([list(range(2, 52))], bos_id=1)


def test_the_scripted_step_is_not_part_of_the_module_tree():
    m = seq2seq()
    keys = set(m.state_dict())
    assert m.use_scripted_step() is None
    assert set(m.state_dict()) == keys
    assert all(not isinstance(mod, torch.jit.ScriptModule) for mod in m.modules())


def test_models_it_cannot_script_say_why():
    from torch.ao.quantization import quantize_dynamic

    fp16 = quantize_dynamic(seq2seq(), {nn.Linear}, dtype=torch.float16)
    assert scriptable(fp16) == "its dynamically quantized layers are not int8"
    assert fp16.use_scripted_step() is not None and fp16._scripted_step is None
    assert scriptable(seq2seq().to(torch.bfloat16)) == "its weights are not fp32 on the CPU"
    assert scriptable(seq2seq().train()) == "in training mode"
    assert scriptable(nn.Linear(2, 2)) == "not a Transformer encoder-decoder"


def test_autocast_training_mode_and_unfilled_caches_fall_back_to_the_eager_step():
    _, scripted = pair(False)
    m = scripted.model
    with torch.inference_mode():
        state, _ = scripted.prefill([[5, 6, 7]], bos_id=1)
        tokens, pos = torch.tensor([[5]]), state.lens[:, None]
        width = len(state.caches[0].self_attn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.scripted_logits(tokens, pos, None, state.memory_mask, state.caches) is None
        m.train()
        assert m.scripted_logits(tokens, pos, None, state.memory_mask, state.caches) is None
        m.eval()
        assert m.scripted_logits(tokens, pos, None, state.memory_mask, m.decoder.new_cache()) is None
        assert len(state.caches[0].self_attn) == width  # nothing was written when it declined
        assert m.scripted_logits(tokens, pos, None, state.memory_mask, state.caches) is not None
        assert len(state.caches[0].self_attn) == width + 1


def test_serving_loads_fp32_transformer_generators_with_the_scripted_step(tmp_path, monkeypatch):
    from chatforge.bench.cases import sample_texts
    from chatforge.bundle import build_from_config, save_bundle
    from chatforge.config import validate_config
    from chatforge.decoding import GenerationOptions
    from chatforge.inference import load_model
    from chatforge.modules.scripted import DECODE_STEP_ENV
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(sample_texts(), vocab_size=600, on_vocab_too_large="lower")
    cfg = validate_config({"name": "scripted", "data": {"path": "x"}, "tracking": {"enabled": False},
                           "model": {"family": "transformer", "task": "generation", "d_model": 32, "n_heads": 2,
                                     "num_encoder_layers": 1, "num_decoder_layers": 2, "d_ff": 64}}, source="test")
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "bundle", model=build_from_config(cfg, tok, None).eval(), tokenizer=tok,
                         config=cfg, labels=None)
    monkeypatch.delenv(DECODE_STEP_ENV, raising=False)
    scripted = load_model(bundle, "chat")
    assert scripted.bundle.model._scripted_step is not None
    monkeypatch.setenv(DECODE_STEP_ENV, "eager")
    eager = load_model(bundle, "chat")
    assert eager.bundle.model._scripted_step is None
    o = GenerationOptions(max_new_tokens=12)
    assert [d.token_id for d in scripted.stream("안녕하세요", o)] == [d.token_id for d in eager.stream("안녕하세요", o)]
