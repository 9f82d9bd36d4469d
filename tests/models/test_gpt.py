"""GPT family: config validation, task pipelines, overfit-one-batch, cached == uncached decoding
(padded batches included), bundle round trip, serving, and every configs/gpt_*.yaml runs a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from chatforge.bundle import load_bundle
from chatforge.config import ConfigError, apply_overrides, validate_config
from chatforge.data import Example
from chatforge.decoding import GenerationOptions, generate, generate_batch
from chatforge.inference import Classifier, Seq2SeqGenerator, load_model
from chatforge.models.gpt import GPTClassifier, GPTConfig, GPTLMHeadModel
from chatforge.registry import SpecialIds
from chatforge.tasks import IGNORE_INDEX, TaskSpec, make_dataset
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
SPECIAL = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=4, sep=5, mask=6)
TINY = dict(d_model=32, n_heads=2, n_layers=2, n_positions=64, dropout=0.0, attn_dropout=0.0)



def lm(task="generation", seed=0, **kw) -> GPTLMHeadModel:
    torch.manual_seed(seed)
    # A wide init makes random models' next-token choices diverse, so decoding tests bite.
    return GPTLMHeadModel(GPTConfig(**{**TINY, "init_std": 0.3, **kw}), 50, SPECIAL, task).eval()


# ---- config ----


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"name": "x", "data": {"path": "sample"}, "model": {"family": "gpt", "task": "lm", "nope": 1}})
    with pytest.raises(ConfigError, match="supports tasks"):
        validate_config({"name": "x", "data": {"path": "sample"}, "model": {"family": "gpt", "task": "tagging"}})


def test_variants_resolve():
    g1, g2 = GPTConfig(variant="gpt"), GPTConfig(variant="gpt2")
    assert (g1.pre_ln, g1.has_final_norm, g1.act) == (False, False, "gelu")
    assert (g2.pre_ln, g2.has_final_norm, g2.act) == (True, True, "gelu_tanh")
    m = lm(variant="gpt2")
    assert m.transformer.ln_f is not None and m.lm_head.weight is m.transformer.wte.weight  # tied


def test_causality():
    m = lm()
    x = torch.randint(7, 50, (1, 10))
    y = x.clone()
    y[0, 6:] = 7
    with torch.inference_mode():
        a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


# ---- pipelines ----


class _Tok:
    """A word-level stand-in with the tokenizer surface the pipelines use."""

    special = SPECIAL
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def encode_batch(self, texts):
        return [[10 + len(w) for w in t.split()] for t in texts]


def test_generation_pipeline_labels_answer_only():
    ds = make_dataset(TaskSpec("generation", "gpt", 8, 8), [Example(text="a bb", response="ccc")], _Tok())
    batch = ds.collate([ds[0]])
    # full sequence: <s> 11 12 [SEP] 13 </s>
    assert batch["input_ids"].tolist() == [[1, 11, 12, 5, 13]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13, 2]]


def test_lm_and_pair_pipelines():
    ex = [Example(text="a bb", response="ccc", label="x"), Example(text="dddd", response="e", label="y")]
    ds = make_dataset(TaskSpec("lm", "gpt", 8, 8), ex, _Tok())
    assert len(ds) == 4 and ds[0] == ([11, 12], [12, 2])
    pair = make_dataset(TaskSpec("pair_classification", "gpt", 8, 8, labels=["x", "y"]), ex, _Tok())
    assert pair[0] == ([11, 12, 5, 13], 0)


def test_loss_on_prompt_trains_the_question_too():
    m = lm(loss_on_prompt=False)
    x = torch.tensor([[1, 11, 12, 5, 13]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13, 2]])
    a = m(x, labels=labels).loss
    m.cfg.loss_on_prompt = True
    b = m(x, labels=labels).loss
    full = torch.tensor([[11, 12, 5, 13, 2]])
    torch.testing.assert_close(b, m(x, labels=full).loss)
    assert not torch.allclose(a, b)


def test_classifier_transform_and_loss_parts():
    torch.manual_seed(0)
    m = GPTClassifier(GPTConfig(**TINY), 50, SPECIAL, num_labels=3)
    x = torch.tensor([[9, 10, 11], [12, 0, 0]])
    t, last = m.transform(x)
    assert t.tolist() == [[1, 9, 10, 11, 4], [1, 12, 4, 0, 0]] and last.tolist() == [4, 2]
    out = m(x, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and set(out.losses) == {"classification", "lm"}
    torch.testing.assert_close(out.loss, out.losses["classification"] + 0.5 * out.losses["lm"])
    # Padding does not change a row's prediction.
    m.eval()
    torch.testing.assert_close(m(x[1:, :1]).logits, m(x).logits[1:], atol=1e-5, rtol=1e-5)


# ---- overfit one batch ----


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
def test_overfit_one_batch_lm(variant):
    m = lm(variant=variant, init_std=0.02).train()
    x = torch.randint(7, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([x[:, 1:], torch.full((4, 1), IGNORE_INDEX)], 1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = m(x, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.05


def test_overfit_one_batch_classifier():
    torch.manual_seed(0)
    m = GPTClassifier(GPTConfig(**TINY), 50, SPECIAL, num_labels=3).train()
    x = torch.randint(7, 50, (6, 8), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(100):
        out = m(x, labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.losses["classification"].item() < 0.05
    assert (m.eval()(x).logits.argmax(-1) == y).all()


# ---- decoding: cached == uncached ----


@pytest.mark.parametrize("variant", ["gpt", "gpt2"])
def test_cached_equals_uncached_stepwise_with_left_padding(variant):
    m = lm(variant=variant)
    src = torch.tensor([[7, 8, 9, 10, 11], [12, 13, 0, 0, 0], [14, 0, 0, 0, 0]])  # right-padded prompts
    with torch.inference_mode():
        a, b = m.init_state(src, use_cache=True), m.init_state(src, use_cache=False)
        assert a.key_mask is not None and a.start_tokens.tolist() == [[5], [5], [5]]
        tok_a, tok_b = a.start_tokens, b.start_tokens
        for step in range(8):
            la, lb = m.decode_step(tok_a, a), m.decode_step(tok_b, b)
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
            tok_a = tok_b = la.argmax(-1, keepdim=True)
            if step == 3:  # drop a row, as batched decoding does when it finishes
                keep = torch.tensor([0, 2])
                a.reorder(keep), b.reorder(keep)
                tok_a, tok_b = tok_a[keep], tok_b[keep]
        # And each row equals the same prompt decoded alone (full forward over the unpadded sequence).
        solo = m.init_state(src[2:, :1])
        assert solo.key_mask is None


def test_generate_batch_equals_single_and_uncached():
    m = lm()
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15], [16]]
    opts = GenerationOptions(max_new_tokens=12)
    batch = generate_batch(m, prompts, opts, bos_id=1, eos_id=2, pad_id=0)
    single = [generate(m, p, opts, bos_id=1, eos_id=2) for p in prompts]
    uncached = [generate(m, p, opts, bos_id=1, eos_id=2, use_cache=False) for p in prompts]
    assert batch == single == uncached
    assert len({tuple(s) for s in single}) == 3 and all(len(set(s)) > 1 for s in single)


def test_lm_task_prompt_is_used_as_given_and_positions_are_capped():
    m = lm(task="lm", n_positions=16)
    state = m.init_state(torch.tensor([[7, 8, 9]]))
    assert state.start_tokens.tolist() == [[9]] and state.max_steps == 14
    out = generate(m, [7, 8, 9], GenerationOptions(max_new_tokens=100), bos_id=1, eos_id=2)
    assert len(out) <= 14
    with pytest.raises(ValueError, match="n_positions"):
        m.init_state(torch.arange(7, 27)[None])


# ---- run -> bundle -> load -> serve ----


def tiny_run_cfg(tmp_path, task: str, **model) -> dict:
    return {
        "name": f"tiny-gpt-{task}", "seed": 1,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1,
                 "stratify": task.endswith("classification")},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "gpt", "task": task, **TINY, "n_layers": 1, **model},
        "train": {"epochs": 1, "max_steps": 4, "batch_size": 16, "lr": 1e-3, "max_source_len": 24,
                  "max_target_len": 24},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


def test_generation_run_bundle_round_trip_and_serving(tmp_path):
    res = run_experiment(validate_config(tiny_run_cfg(tmp_path, "generation")), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 4 and res.metrics["samples"]
    b1, b2 = load_bundle(res.bundle_dir), load_bundle(res.bundle_dir)
    x = torch.randint(4, b1.tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(b1.model(input_ids=x).logits, b2.model(input_ids=x).logits)
    served = load_model(res.bundle_dir, "g")
    assert isinstance(served, Seq2SeqGenerator)
    deltas = list(served.stream("hello", GenerationOptions(max_new_tokens=5)))
    assert 1 <= len(deltas) <= 5 or deltas == []
    ids = b1.tokenizer.encode("hello")
    assert [d.token_id for d in deltas] == generate(b1.model, ids, GenerationOptions(max_new_tokens=5),
                                                    bos_id=1, eos_id=2)


def test_classification_run_bundle_round_trip_and_serving(tmp_path):
    res = run_experiment(validate_config(tiny_run_cfg(tmp_path, "classification")), run_dir=tmp_path / "run")
    hist = res.metrics["history"][0]
    assert "train_classification_loss" in hist and "train_lm_loss" in hist
    b1, b2 = load_bundle(res.bundle_dir), load_bundle(res.bundle_dir)
    x = torch.randint(4, b1.tokenizer.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(b1.model(input_ids=x).logits, b2.model(input_ids=x).logits)
    served = load_model(res.bundle_dir, "c")
    assert isinstance(served, Classifier)
    preds = served.classify(["hello there", "bye"])
    assert len(preds) == 2 and preds[0].label in b1.labels
    assert sum(preds[0].scores.values()) == pytest.approx(1.0, abs=1e-4)


# ---- every configs/gpt_*.yaml builds and runs one step ----

# ChatbotData classification keeps the whole corpus (sorted by label), so those take ~5-8 s.
CONFIGS = [pytest.param(p, marks=pytest.mark.slow) if "_kr_cls" in p.name or "_kr_pair" in p.name else p
           for p in sorted((REPO / "configs").glob("gpt_*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_runs_one_step(path, tmp_path):
    tree = yaml.safe_load(path.read_text())
    data = Path(tree["data"]["path"])
    data = data if data.is_absolute() else (REPO / data).resolve()
    if not data.is_file():
        pytest.skip(f"{data} is absent (see ../shared/data/README.md)")
    # Generation needs few examples; classification keeps all (the files are sorted by label).
    few = [] if tree["model"]["task"].endswith("classification") else ["data.max_examples=64"]
    tree = apply_overrides(tree, [*few,
        f"data.path={data}", "train.max_steps=1", "train.epochs=1", "train.batch_size=8",
        "tokenizer.vocab_size=1500", "tokenizer.on_vocab_too_large=lower", "model.d_model=32", "model.n_heads=2",
        "model.n_layers=1", f"output.dir={tmp_path}", "tracking.enabled=false", "train.precision=fp32",
    ])
    cfg = validate_config(tree, source=str(path))
    if cfg.data.split == "predefined":  # CLINC150 validation lists are large; one step needs few
        cfg.data.valid_keys = ["oos_val"]
    res = run_experiment(cfg, run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 1 and (res.bundle_dir / "weights.safetensors").is_file()
