"""ELMo: char-CNN spelling, biLM directions, LM/classifier overfitting, frozen features,
lm bundle -> classification via init_from, bundles served by the Classifier, configs."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from chatforge.bundle import load_bundle
from chatforge.config import apply_overrides, load_config, validate_config
from chatforge.inference import Classifier, load_model
from chatforge.models.elmo.model import (
    CHAR_BOW,
    CHAR_EOW,
    CHAR_OFFSET,
    ElmoClassifier,
    ElmoConfig,
    ElmoLanguageModel,
    _reverse_padded,
    spell_pieces,
)
from chatforge.registry import BuildContext, SpecialIds, build_model
from chatforge.training.run import run_experiment

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
V = 24
SPECIAL = SpecialIds()


class FakeTok:
    vocab_size = V

    def id_to_piece(self, i: int) -> str:
        return ["<pad>", "<s>", "</s>", "<unk>"][i] if i < 4 else "\u2581" + "abcdefgh"[i % 8] * (1 + i % 3)


def tiny(**kw) -> ElmoConfig:
    base = dict(max_chars=8, char_embed_dim=8, filters=[(1, 8), (2, 8), (3, 16)], num_highway=1,
                projection_dim=16, lstm_hidden=16, dropout=0.0)
    base.update(kw)
    return ElmoConfig(**base)


def lm(**kw) -> ElmoLanguageModel:
    m = ElmoLanguageModel(tiny(**kw), V, SPECIAL)
    m.set_vocabulary(FakeTok())
    return m


def clf(n: int = 3, **kw) -> ElmoClassifier:
    m = ElmoClassifier(tiny(**kw), V, SPECIAL, n)
    m.set_vocabulary(FakeTok())
    return m


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="wider than max_chars"):
        tiny(filters=[(9, 4)])
    with pytest.raises(ValidationError, match="lstm_hidden=8 must be >= projection_dim=16"):
        tiny(lstm_hidden=8)
    with pytest.raises(ValidationError, match="pooling"):
        tiny(pooling="first")
    with pytest.raises(ValidationError, match="n_layers"):
        ElmoConfig(n_layers=2)
    with pytest.raises(ValueError, match="does not support task 'generation'"):
        build_model("elmo", tiny(), BuildContext("generation", V, SPECIAL))


def test_spelling_is_utf8_bytes_with_markers():
    table = spell_pieces(["ab", "한", "abcdefghij"], max_chars=6)
    assert table[0].tolist() == [CHAR_BOW, ord("a") + CHAR_OFFSET, ord("b") + CHAR_OFFSET, CHAR_EOW, 0, 0]
    assert table[1, 1:4].tolist() == [b + CHAR_OFFSET for b in "한".encode()]
    assert table[2, -1].item() == CHAR_EOW  # truncated, still closed


def test_model_without_spelling_fails_clearly():
    m = ElmoLanguageModel(tiny(), V, SPECIAL)
    with pytest.raises(RuntimeError, match="set_vocabulary"):
        m(torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="vocab_size=24"):
        m.set_vocabulary(type("T", (), {"vocab_size": 5, "id_to_piece": lambda self, i: "x"})())


def test_reverse_padded():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])[..., None]
    assert _reverse_padded(x, torch.tensor([3, 2]))[..., 0].tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]


def test_directions_see_only_their_side():
    m = lm().eval()
    a = torch.tensor([[5, 6, 7, 8, 9, 10]])
    b = a.clone()
    b[0, 3] = 11  # change token 3 (framed position 4)
    framed_a, n = m.elmo.frame(a)
    framed_b, _ = m.elmo.frame(b)
    _, fa, ba = m.elmo(framed_a, n)
    _, fb, bb = m.elmo(framed_b, n)
    torch.testing.assert_close(fa[-1][:, :4], fb[-1][:, :4])  # forward: before position 4 unchanged
    assert not torch.allclose(fa[-1][:, 4:], fb[-1][:, 4:])
    torch.testing.assert_close(ba[-1][:, 5:], bb[-1][:, 5:])  # backward: after position 4 unchanged
    assert not torch.allclose(ba[-1][:, :5], bb[-1][:, :5])


def test_lm_shapes_losses_and_padding():
    m = lm().eval()
    x = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    out = m(x, labels=x.masked_fill(x == 0, -100))
    assert out.logits.shape == (2, 4, V)
    assert set(out.losses) == {"lm_forward", "lm_backward"}
    torch.testing.assert_close(out.loss, 0.5 * (out.losses["lm_forward"] + out.losses["lm_backward"]))
    alone = m(x[:1, :3], labels=x[:1, :3]).logits
    torch.testing.assert_close(out.logits[:1, :3], alone, atol=1e-5, rtol=1e-5)
    # one softmax for both directions
    assert sum(isinstance(mod, torch.nn.Linear) and mod.out_features == V for mod in m.modules()) == 1


def _fit(model, batch, steps=300, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    return loss.item()


def test_lm_overfits_one_batch():
    x = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0], [12, 13, 0, 0]])
    m = lm()
    # Only the first token (from <s>, forward) and the last (from </s>, backward) are ambiguous:
    # 3 of the 12 targets per direction are each one of 3 tokens, a floor of 3 ln 3 / 12.
    floor = 3 * torch.log(torch.tensor(3.0)).item() / 12
    assert _fit(m, {"input_ids": x, "labels": x.masked_fill(x == 0, -100)}, steps=200) < floor + 0.03
    m.eval()
    pred = m(x).logits.argmax(-1)
    assert pred[0, 1:].tolist() == [6, 7, 8] and pred[1, 1:3].tolist() == [10, 11]


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_classifier_overfits_and_ignores_padding(pooling):
    x = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13], [14, 15, 0, 0], [5, 9, 13, 0], [16, 17, 18, 0]])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    m = clf(pooling=pooling, mix_layer_norm=pooling == "max")
    assert _fit(m, {"input_ids": x, "labels": y}, steps=200) < 0.05
    m.eval()
    assert m(x).logits.argmax(-1).tolist() == y.tolist()
    torch.testing.assert_close(m(x[1:2, :2]).logits, m(x[1:2]).logits, atol=1e-5, rtol=1e-5)


def test_frozen_lm_trains_only_mix_and_head():
    m = clf(freeze_lm=True, dropout=0.2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    assert not m.elmo.training and m.head.training
    x, y = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([0, 2])
    _fit(m, {"input_ids": x, "labels": y}, steps=3)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("elmo."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["mix.scalars"], after["mix.scalars"])
    assert all(not p.requires_grad for p in m.elmo.parameters())


# ---- run driver: lm bundle -> classification via init_from; serving ----


def tiny_tree(tmp_path, task: str, **model) -> dict:
    return {
        "name": f"tiny-elmo-{task}", "seed": 1,
        "data": {"path": "sample", "valid_fraction": 0.1, "test_fraction": 0.1,
                 "stratify": task == "classification"},
        "tokenizer": {"vocab_size": 600, "on_vocab_too_large": "lower"},
        "model": {"family": "elmo", "task": task, "max_chars": 8, "char_embed_dim": 8,
                  "filters": [[1, 8], [2, 8]], "num_highway": 1, "projection_dim": 16, "lstm_hidden": 16,
                  "dropout": 0.0, **model},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 1e-3, "max_source_len": 16},
        "output": {"dir": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elmo-lm")
    return run_experiment(validate_config(tiny_tree(tmp, "lm")), run_dir=tmp / "run")


def test_lm_run_bundle_round_trip(lm_run):
    assert lm_run.metrics["steps"] == 3 and "valid_loss" in lm_run.metrics
    b1, b2 = load_bundle(lm_run.bundle_dir), load_bundle(lm_run.bundle_dir)
    x = torch.tensor([b1.tokenizer.encode("안녕하세요 반가워요")])
    with torch.inference_mode():
        assert torch.equal(b1.model(input_ids=x).logits, b2.model(input_ids=x).logits)
    table = b1.model.elmo.char_encoder.char_table
    assert table.abs().sum() > 0 and table.size(0) == b1.tokenizer.vocab_size


def test_init_from_lm_bundle_to_frozen_classifier(lm_run, tmp_path):
    tree = tiny_tree(tmp_path, "classification", freeze_lm=True)
    tree["model"]["init_from"] = str(lm_run.run_dir)
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "cls")
    assert res.metrics["init_from"]["loaded"] > 0 and res.metrics["init_from"]["dropped"] == 2  # softmax
    pre, fine = load_bundle(lm_run.bundle_dir), load_bundle(res.bundle_dir)
    assert pre.tokenizer.sha256 == fine.tokenizer.sha256
    a, b = pre.model.state_dict(), fine.model.state_dict()
    elmo_keys = [k for k in a if k.startswith("elmo.")]
    assert elmo_keys and all(torch.equal(a[k], b[k]) for k in elmo_keys)  # frozen: unchanged
    c = load_model(res.bundle_dir, name="intent")
    assert isinstance(c, Classifier)
    preds = c.classify(["안녕하세요", "what's the weather like?"])
    assert len(preds) == 2 and all(p.label in c.labels for p in preds)
    assert all(abs(sum(p.scores.values()) - 1.0) < 1e-4 for p in preds)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("elmo_*.yaml")), ids=lambda p: p.name)
def test_shipped_config_runs_one_step(path, tmp_path):
    cfg = load_config(path)
    data = Path(cfg.data.path)
    if not data.is_absolute() and data.parts[:3] == ("..", "shared", "data"):
        data = SHARED.joinpath(*data.parts[3:])
    if not data.is_file():
        pytest.skip(f"data set {data} not found (see ../shared/data/README.md)")
    tree = apply_overrides(cfg.to_dict(), [
        f"data.path={data}", "tokenizer.vocab_size=600",
        "tokenizer.character_coverage=0.98", "tokenizer.on_vocab_too_large=lower", "train.max_steps=1",
        "train.batch_size=8", "train.max_source_len=8", "model.filters=[[1, 4], [2, 4]]", "model.max_chars=6",
        "model.projection_dim=8", "model.lstm_hidden=8", "model.num_highway=1", "tracking.enabled=false",
        f"output.dir={tmp_path}",
    ])
    if cfg.model.task == "lm":
        tree["data"]["max_examples"] = 64  # train lists are sorted by label: classifiers need them all
    if tree["data"].get("split") != "predefined":
        tree["data"].update(valid_fraction=0.01, test_fraction=0.0)
    else:
        tree["data"]["valid_keys"] = ["oos_val"]  # 100 examples keep the one-step run fast
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "run")
    assert res.metrics["steps"] == 1 and (res.bundle_dir / "weights.safetensors").is_file()
