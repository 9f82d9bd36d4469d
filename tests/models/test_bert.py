"""BERT family: masking/NSP statistics, heads, overfitting, bundles, configs, serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.bundle import load_bundle, save_bundle
from chatforge.config import ConfigError, validate_config
from chatforge.data import Example
from chatforge.inference import Classifier, load_model
from chatforge.models.bert import (
    BertConfig,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from chatforge.models.bert.pipeline import (
    BertClassificationDataset,
    BertMaskedLMDataset,
    BertPretrainingDataset,
    TokenTaggingDataset,
    encode_pair,
    mask_tokens,
    read_tagged_jsonl,
)
from chatforge.registry import BuildContext, SpecialIds, build_model
from chatforge.tasks import IGNORE_INDEX, TaskDataError
from chatforge.tokenizer import Tokenizer
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
SPECIAL = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=4, sep=5, mask=6)
TINY = BertConfig(d_model=32, n_heads=2, num_layers=2, d_ff=64, dropout=0.0, max_len=64)
V = 40


def _batch(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """[CLS] a [SEP] b [SEP] then padding, with random lengths; text ids are >= 7."""
    x = torch.full((B, T), SPECIAL.pad, dtype=torch.long)
    for i in range(B):
        n = int(torch.randint(T // 2, T - 3, (1,), generator=gen))
        cut = n // 2
        body = torch.randint(7, V, (n,), generator=gen)
        row = [SPECIAL.cls, *body[:cut].tolist(), SPECIAL.sep, *body[cut:].tolist(), SPECIAL.sep]
        x[i, : len(row)] = torch.tensor(row)
    return x


def test_mlm_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    x = _batch(1024, 64, gen)
    corrupted, labels = mask_tokens(x, SPECIAL, V, generator=gen)
    special = (x == SPECIAL.cls) | (x == SPECIAL.sep) | (x == SPECIAL.pad)
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any(), "special tokens must never be selected"
    assert torch.equal(corrupted[special], x[special]), "special tokens must be left as they are"
    assert torch.equal(labels[selected], x[selected]) and (labels[~selected] == IGNORE_INDEX).all()
    assert (corrupted[~selected] == x[~selected]).all()
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = selected.sum().item()
    as_mask = (corrupted[selected] == SPECIAL.mask).sum().item() / n
    unchanged = (corrupted[selected] == x[selected]).sum().item() / n
    replaced = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02 and abs(replaced - 0.1) < 0.02 and abs(unchanged - 0.1) < 0.02
    # random replacements are text tokens, never [CLS]/[SEP]/[MASK]/pad
    rnd = selected & (corrupted != SPECIAL.mask) & (corrupted != x)
    assert (corrupted[rnd] >= 7).all()
    # every row with text gets at least one prediction
    assert (selected.sum(1) >= 1).all()


def test_masking_needs_mask_token():
    with pytest.raises(TaskDataError, match=r"\[MASK\]"):
        mask_tokens(torch.tensor([[4, 9, 5]]), SpecialIds(cls=4, sep=5), V)


def _pair_examples(n: int) -> list[Example]:
    return [Example(text=f"q{i}", response=f"a{i}", label=str(i % 3)) for i in range(n)]


def _fake_encode(texts: list[str]) -> list[list[int]]:
    # "q17" -> [7 + 17 % 30, 8]; "a17" -> [7 + 17 % 30, 9, 10]: question/answer identity recoverable
    return [[7 + int(t[1:]) % 30, 8] if t[0] == "q" else [7 + int(t[1:]) % 30, 9, 10] for t in texts]


def test_nsp_pairs_are_balanced_and_negatives_are_other_examples():
    ds = BertPretrainingDataset(_pair_examples(30), SPECIAL, V, _fake_encode, 32,
                                generator=torch.Generator().manual_seed(0))
    batch = ds.collate([i % 30 for i in range(4000)])
    nsp = batch["next_sentence_label"]
    assert abs(nsp.float().mean().item() - 0.5) < 0.03
    ids, seg = batch["input_ids"], batch["token_type_ids"]
    assert (ids[:, 0] == SPECIAL.cls).all() and (ids[:, 3] == SPECIAL.sep).all() and (ids[:, 7] == SPECIAL.sep).all()
    assert (seg[:, :4] == 0).all() and (seg[:, 4:8] == 1).all()
    # answer identity from the original (pre-masking) tokens: labels hold them where masked
    orig = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], ids)
    same = orig[:, 1] == orig[:, 4]
    assert torch.equal(same, nsp == 0), "label 0 must keep the example's own answer, 1 another's"


def test_pretraining_needs_pairs():
    with pytest.raises(TaskDataError, match="no response"):
        BertPretrainingDataset([Example("a"), Example("b")], SPECIAL, V, _fake_encode, 16)


def test_mlm_alone_reads_single_sentences_without_next_sentence_labels():
    examples = [Example("q1"), Example("q2", response="a3"), Example("q4")]
    ds = BertMaskedLMDataset(examples, SPECIAL, V, _fake_encode, 16, generator=torch.Generator().manual_seed(0))
    assert len(ds) == 4  # every text, and the response as a sentence of its own
    batch = ds.collate(list(range(4)) * 50)
    assert "next_sentence_label" not in batch
    ids, seg, labels = batch["input_ids"], batch["token_type_ids"], batch["labels"]
    assert (ids[:, 0] == SPECIAL.cls).all() and (seg == 0).all()
    orig = torch.where(labels != IGNORE_INDEX, labels, ids)
    # texts first, then responses: q1 is [CLS] 8 8 [SEP] (pad); the response a3 is [CLS] 10 9 10 [SEP]
    assert (orig[0::4, :4] == torch.tensor([SPECIAL.cls, 8, 8, SPECIAL.sep])).all()
    assert (orig[3::4, :5] == torch.tensor([SPECIAL.cls, 10, 9, 10, SPECIAL.sep])).all()
    assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()  # every sequence has something to predict
    assert not ((labels != IGNORE_INDEX) & ((orig == SPECIAL.cls) | (orig == SPECIAL.sep))).any()
    with pytest.raises(TaskDataError, match=r"'mlm' needs a tokenizer with a \[MASK\]"):
        BertMaskedLMDataset(examples, SpecialIds(pad=0, cls=4, sep=5), V, _fake_encode, 16)


def test_pair_encoding_and_truncation():
    ids, seg = encode_pair([10, 11, 12, 13, 14, 15], [20, 21], SPECIAL, 8)
    assert ids == [4, 10, 11, 12, 5, 20, 21, 5] and seg == [0, 0, 0, 0, 0, 1, 1, 1]
    ids, seg = encode_pair([10, 11, 12], None, SPECIAL, 4)
    assert ids == [4, 10, 11, 5] and seg == [0, 0, 0, 0]
    with pytest.raises(TaskDataError, match=r"\[CLS\] and \[SEP\]"):
        encode_pair([10], None, SpecialIds(), 8)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"name": "x", "data": {"path": "sample"},
                         "model": {"family": "bert", "task": "mlm_nsp", "hidden": 3}})
    with pytest.raises(ValueError, match=r"\[CLS\] and \[SEP\]"):
        build_model("bert", TINY, BuildContext("classification", V, SpecialIds(), num_labels=2))


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    m = BertForSequenceClassification(TINY, V, SPECIAL, 3).eval()
    x = torch.tensor([[4, 9, 10, 11, 5]])
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        a = m(x).logits
        b = m(padded).logits
        h1, _ = m.bert(x)
        h2, _ = m.bert(padded)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h2[:, :5], atol=1e-5, rtol=1e-5)


def test_sparse_mlm_logits_match_full_logits():
    torch.manual_seed(0)
    m = BertForPreTraining(TINY, V, SPECIAL).eval()
    x = _batch(4, 16, torch.Generator().manual_seed(1))
    corrupted, labels = mask_tokens(x, SPECIAL, V, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(corrupted).logits  # (B, T, V)
        out = m(corrupted, labels=labels, next_sentence_label=torch.tensor([0, 1, 0, 1]))
    sel = labels != IGNORE_INDEX
    torch.testing.assert_close(out.logits, full[sel])
    expected = torch.nn.functional.cross_entropy(full[sel], labels[sel])
    torch.testing.assert_close(out.losses["mlm"], expected)
    assert set(out.losses) == {"mlm", "nsp"}
    torch.testing.assert_close(out.loss, out.losses["mlm"] + out.losses["nsp"])


def _overfit(model, batch, steps=80, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    first = None
    for _ in range(steps):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    return first, out


def test_overfit_one_batch_pretraining():
    torch.manual_seed(0)
    m = BertForPreTraining(TINY, V, SPECIAL)
    ds = BertPretrainingDataset(_pair_examples(8), SPECIAL, V, _fake_encode, 16,
                                generator=torch.Generator().manual_seed(0))
    batch = ds.collate(list(range(8)))  # one fixed batch: fixed masks and pairs
    first, out = _overfit(m, batch)
    assert out.losses["mlm"].item() < 0.05 * first and out.losses["nsp"].item() < 0.05


def test_overfit_one_batch_classification():
    torch.manual_seed(0)
    m = BertForSequenceClassification(TINY, V, SPECIAL, 3)
    ds = BertClassificationDataset(_pair_examples(9), SPECIAL, _fake_encode, ["0", "1", "2"], 16, pairs=True)
    batch = ds.collate([ds[i] for i in range(9)])
    _, out = _overfit(m, batch)
    assert out.loss.item() < 0.02 and torch.equal(out.logits.argmax(-1), batch["labels"])


def test_token_classification_reads_tags_and_overfits(tmp_path):
    f = tmp_path / "slots.jsonl"
    rows = [{"tokens": ["wake", "me", "at", "7", "am"], "tags": ["O", "O", "O", "B-time", "I-time"]},
            {"tokens": ["play", "jazz"], "tags": ["O", "B-genre"]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sents = read_tagged_jsonl(f)
    tags = ["O", "B-time", "I-time", "B-genre"]

    def enc(words):  # words -> 1 or 2 sub-tokens, so first-sub-token labelling is exercised
        return [[7 + len(w)] if len(w) < 4 else [7 + len(w), 30] for w in words]

    ds = TokenTaggingDataset(sents, SPECIAL, enc, tags, 16)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["labels"][0].tolist() == [-100, 0, -100, 0, 0, 1, 2, -100]
    assert batch["labels"][1].tolist() == [-100, 0, -100, 3, -100, -100, -100, -100]
    torch.manual_seed(0)
    m = build_model("bert", TINY, BuildContext("token_classification", V, SPECIAL, num_labels=len(tags)))
    assert isinstance(m, BertForTokenClassification) and m.bert.pooler is None
    _, out = _overfit(m, batch, steps=60)
    keep = batch["labels"] != IGNORE_INDEX
    assert out.logits.shape == (2, batch["input_ids"].size(1), 4)
    assert torch.equal(out.logits.argmax(-1)[keep], batch["labels"][keep])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(TaskDataError, match="bad.jsonl:1: 2 tokens but 1 tags"):
        read_tagged_jsonl(bad)


# ----------------------------------------------------------------------------------- bundles and runs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from chatforge.data import read_examples, sample_corpus_path

    ex, _ = read_examples(sample_corpus_path())
    return Tokenizer.train([e.text for e in ex] + [e.response for e in ex if e.response],
                           vocab_size=600, on_vocab_too_large="lower")


def _cfg(task: str, tmp_path, **extra) -> dict:
    return {
        "name": f"tiny-bert-{task}", "seed": 0,
        "data": {"path": "sample", "valid_fraction": 0.2, "test_fraction": 0.0},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "bert", "task": task, "d_model": 32, "n_heads": 2, "num_layers": 1, "d_ff": 64,
                  "max_len": 32, **extra},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "max_source_len": 24},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


@pytest.mark.parametrize("task", ["mlm_nsp", "classification", "pair_classification"])
def test_save_bundle_load_same_outputs(task, tok, tmp_path):
    cfg = validate_config(_cfg(task, tmp_path))
    labels = None if task == "mlm_nsp" else ["0", "1", "2"]
    from chatforge.bundle import build_from_config

    torch.manual_seed(0)
    model = build_from_config(cfg, tok, labels).eval()
    out = save_bundle(tmp_path / "b", model=model, tokenizer=tok, config=cfg, labels=labels)
    b = load_bundle(out)
    inputs = model.prepare_inputs([tok.encode("안녕하세요 반가워요"), tok.encode("hello there")],
                                  [tok.encode("네"), tok.encode("hi")] if task != "classification" else None)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, b.model(**inputs).logits)
    if task == "classification":
        c = load_model(out, name="bert-intent")
        assert isinstance(c, Classifier)
        preds = c.classify(["안녕하세요", "what's the weather like?"])
        with torch.no_grad():
            direct = model(**model.prepare_inputs([tok.encode("안녕하세요"), tok.encode("what's the weather like?")]))
        probs = direct.logits.softmax(-1)
        assert [p.label for p in preds] == [labels[i] for i in probs.argmax(-1).tolist()]
        assert abs(preds[0].score - probs[0].max().item()) < 1e-5


def test_pretrain_then_finetune_runs(tmp_path):
    pre = run_experiment(validate_config(_cfg("mlm_nsp", tmp_path)), run_dir=tmp_path / "pre")
    assert {"train_mlm_loss", "train_nsp_loss"} <= set(pre.metrics["history"][0])
    ft_cfg = _cfg("classification", tmp_path)
    ft_cfg["model"]["init_from"] = str(pre.run_dir)
    ft = run_experiment(validate_config(ft_cfg), run_dir=tmp_path / "ft")
    assert ft.metrics["init_from"]["loaded"] > 10  # the whole backbone came from the pre-trained run
    assert ft.metrics["init_from"]["new"] == 2  # classifier weight and bias


def test_mlm_on_unlabelled_text_then_a_finetune_takes_its_shape(tmp_path):
    extra = tmp_path / "unlabelled.txt"
    extra.write_text("".join(f"unlabelled sentence number {i}\n" for i in range(40)) + "\n  \n", encoding="utf-8")
    pre_cfg = _cfg("mlm", tmp_path)
    pre_cfg["data"]["unlabelled"] = str(extra)
    plain = run_experiment(validate_config(_cfg("mlm", tmp_path)), run_dir=tmp_path / "plain")
    pre = run_experiment(validate_config(pre_cfg), run_dir=tmp_path / "pre")
    assert pre.metrics["train_examples"] == plain.metrics["train_examples"] + 40  # blank lines skipped
    assert "train_mlm_loss" in pre.metrics["history"][0] and "train_nsp_loss" not in pre.metrics["history"][0]
    assert load_bundle(pre.run_dir / "bundle").task == "mlm"
    # The fine-tune's config names no shape: d_model, layers... come from the pre-trained bundle.
    ft_cfg = _cfg("classification", tmp_path)
    for k in ("d_model", "n_heads", "num_layers", "d_ff", "max_len"):
        del ft_cfg["model"][k]
    ft_cfg["model"]["init_from"] = str(pre.run_dir)
    ft = run_experiment(validate_config(ft_cfg), run_dir=tmp_path / "ft")
    assert ft.metrics["init_from"]["new"] == 2  # only the classifier: the whole backbone was loaded
    b = load_bundle(ft.run_dir / "bundle")
    assert b.config.model.params["d_model"] == 32 and b.config.model.params["num_layers"] == 1
    ft_cfg["model"]["d_ff"] = 128
    with pytest.raises(ConfigError, match=r"model.d_ff: config 128, pre-trained 64"):
        run_experiment(validate_config(ft_cfg), run_dir=tmp_path / "ft2")


def test_unlabelled_text_is_refused_where_it_cannot_be_read(tmp_path):
    cfg = _cfg("classification", tmp_path)
    cfg["data"]["unlabelled"] = str(tmp_path / "x.txt")
    with pytest.raises(ConfigError, match=r"data.unlabelled .*task 'mlm'.*task 'classification'"):
        validate_config(cfg)
    cfg = _cfg("mlm", tmp_path)
    cfg["data"]["unlabelled"] = str(tmp_path / "missing.txt")
    with pytest.raises(Exception, match=r"data.unlabelled: file not found: .*missing.txt"):
        run_experiment(validate_config(cfg), run_dir=tmp_path / "r")
