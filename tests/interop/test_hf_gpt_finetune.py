"""Fine-tuning a team's pre-trained GPT-2 checkpoint (issue 17): HF folder -> `chatforge convert from-hf` ->
`chatforge train configs/gpt2_chatbot_kr_finetune.yaml --set model.init_from=...` -> evaluate, serve, `to-hf`.

No download: the "team's checkpoint" is a random-weight ``GPT2LMHeadModel`` saved with ``save_pretrained``
next to a byte-level BPE ``tokenizer.json`` trained here on Korean text, with ``<|endoftext|>`` as its only
special token and no pad token (how GPT-2 checkpoints ship)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from typer.testing import CliRunner  # noqa: E402

from chatforge.bundle import load_bundle  # noqa: E402
from chatforge.cli import app  # noqa: E402
from chatforge.config import ConfigError, load_config, validate_config  # noqa: E402
from chatforge.interop import from_hf  # noqa: E402
from chatforge.tasks import make_dataset  # noqa: E402
from chatforge.training.run import load_splits, run_experiment  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "gpt2_chatbot_kr_finetune.yaml"
FP32 = dict(atol=1e-5, rtol=1e-5)  # as tests/interop/test_hf_gpt.py: fp32 reordering noise is ~1e-6
PAIRS = [("안녕하세요", "반가워요."), ("오늘 날씨 어때", "맑고 따뜻해요."), ("배고파", "맛있는 거 드세요."),
         ("심심해", "친구랑 놀아보세요."), ("잠이 안 와", "따뜻한 우유 어때요."), ("영화 보고 싶어", "요즘 재밌는 거 많아요."),
         ("사랑해", "저도 사랑해요."), ("헤어졌어", "힘든 시간이겠네요.")] * 3
SAMPLES = ["오늘 날씨 어때?", "가끔 궁금해", "헤어진 지 한 달, 아직도 힘들어요 ㅠㅠ", "GPT-2 fine-tuning 123"]


def team_checkpoint(out: Path, texts: list[str], *, vocab_size: int = 400, n_positions: int = 64) -> Path:
    """A GPT-2 folder as a team downloads one: config.json + model.safetensors (random weights, 2 layers,
    d 64) + tokenizer.json/tokenizer_config.json (byte-level BPE with <|endoftext|>, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    eot = tk.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tk.get_vocab_size(), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eot, eos_token_id=eot))
    model.eval().save_pretrained(str(out))
    return out


def hf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def write_pairs(path: Path, pairs) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Q", "A", "label"])
        w.writerows((q, a, 0) for q, a in pairs)
    return path


def finetune_tree(tmp_path: Path, init_from: Path, data: Path, **model) -> dict:
    """The shipped config, on a tiny corpus and budget."""
    tree = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    tree["data"]["path"] = str(data)
    tree["model"].update(init_from=str(init_from), **model)
    tree["train"].update(epochs=1, max_steps=2, batch_size=8, monitor="valid_loss")
    tree["output"] = {"dir": str(tmp_path / "runs")}
    tree["tracking"] = {"enabled": False}
    return tree


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    ckpt = team_checkpoint(tmp / "kogpt2", [t for pair in PAIRS for t in pair])
    return ckpt, from_hf(ckpt, tmp / "imported"), write_pairs(tmp / "pairs.csv", PAIRS)


def test_shipped_config_trains_generation_with_the_auxiliary_lm_loss():
    cfg = load_config(SHIPPED)
    fc = cfg.model.family_config()
    assert (cfg.model.family, cfg.model.task, cfg.data.format) == ("gpt", "generation", "chatbot_csv")
    assert fc.loss_on_prompt  # the question's LM loss next to the answer's
    # No architecture key: they all come from the checkpoint (model.init_from).
    assert not set(cfg.model.params) & set(type(fc).ARCHITECTURE_KEYS)


def test_fine_tune_takes_every_checkpoint_tensor_and_its_shapes(converted, tmp_path):
    """Regression: the config names no d_model/n_layers/variant, and chatforge used to build its own default
    GPT (d 256, 4 layers, post-LN) and load 0 of the checkpoint's 29 tensors without a word."""
    ckpt, bundle, data = converted
    res = run_experiment(validate_config(finetune_tree(tmp_path, bundle, data)), run_dir=tmp_path / "ft")
    n = len(load_bundle(bundle).model.state_dict())
    assert res.metrics["init_from"] == {"loaded": n, "new": 0, "dropped": 0}
    hf = json.loads((ckpt / "config.json").read_text())
    model = yaml.safe_load((res.run_dir / "config.yaml").read_text())["model"]  # the run records the network
    assert (model["variant"], model["d_model"], model["n_layers"], model["n_heads"], model["n_positions"]) == (
        "gpt2", hf["n_embd"], hf["n_layer"], hf["n_head"], hf["n_positions"])
    assert res.metrics["num_parameters"] == sum(p.numel() for p in transformers.GPT2LMHeadModel.from_pretrained(
        str(ckpt)).parameters())


def test_training_uses_the_checkpoint_tokenizer_ids_and_endoftext(converted, tmp_path):
    ckpt, bundle, data = converted
    cfg = validate_config(finetune_tree(tmp_path, bundle, data))
    res = run_experiment(cfg, run_dir=tmp_path / "ft")
    assert (res.run_dir / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert not (res.run_dir / "tokenizer.model").exists()  # no SentencePiece vocabulary was trained
    tok = load_bundle(res.bundle_dir).tokenizer
    ref = hf_tokenizer(ckpt)
    for text in SAMPLES:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"]) == text
    # GPT-2 has one special token: it begins the prompt, separates question and answer (no [SEP] in the
    # vocabulary) and ends the answer; pad is the same id, and padding is never a label.
    eot = ref.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.special.sep) == (eot, eot, eot, None)
    from chatforge.data import Example
    from chatforge.tasks import TaskSpec

    q, a = PAIRS[1]
    ds = make_dataset(TaskSpec("generation", "gpt", 40, 40, None), [Example(text=q, response=a)], tok)
    x, y = ds[0]
    prompt = [eot, *ref(q)["input_ids"], eot]
    answer = [*ref(a)["input_ids"], eot]
    assert x == prompt + answer[:-1]
    assert y == [-100] * (len(prompt) - 1) + answer  # labels on the answer only; loss_on_prompt adds the rest


def test_a_vocabulary_with_its_own_pad_token_pads_with_it():
    """KoGPT2-style vocabularies ship <pad>: batches pad with it, not with <|endoftext|>, and never learn it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from chatforge.data import Example
    from chatforge.interop.hf_tokenizer import HFTokenizer
    from chatforge.tasks import TaskSpec

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([t for p in PAIRS for t in p], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = HFTokenizer.from_tokenizers(tk)
    pad, eot = tk.token_to_id("<pad>"), tk.token_to_id("<|endoftext|>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (pad, eot, eot) and pad != eot
    ds = make_dataset(TaskSpec("generation", "gpt", 40, 40, None), [Example(text=q, response=a) for q, a in PAIRS[:2]],
                      tok)
    batch = ds.collate([ds[0], ds[1]])
    short = int(len(ds[0][0]) > len(ds[1][0]))  # the row that gets padding
    n = len(ds[short][0])
    assert n < batch["input_ids"].size(1)  # there is padding to check
    assert (batch["input_ids"][short, n:] == pad).all() and (batch["labels"][short, n:] == -100).all()
    assert pad not in batch["labels"].tolist()[1 - short]


@pytest.mark.parametrize(("key", "value"), [("d_model", 32), ("n_layers", 3), ("n_heads", 2), ("variant", "gpt")])
def test_config_keys_that_disagree_with_the_checkpoint_name_both_values(converted, tmp_path, key, value):
    _, bundle, data = converted
    with pytest.raises(ConfigError) as e:
        run_experiment(validate_config(finetune_tree(tmp_path, bundle, data, **{key: value})), run_dir=tmp_path / "r")
    msg = str(e.value)
    assert "model.init_from" in msg and "pre-trained" in msg
    if key != "variant":  # the variant shows as what it changes (activation, norm placement)
        theirs = load_bundle(bundle).config.model.params[key]
        assert f"model.{key}: config {value!r}, pre-trained {theirs!r}" in msg
    else:
        assert "model.norm_first: config False, pre-trained True" in msg
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_config_keys_that_agree_with_the_checkpoint_are_accepted(converted, tmp_path):
    _, bundle, data = converted
    tree = finetune_tree(tmp_path, bundle, data, variant="gpt2", d_model=64, activation="gelu_tanh")
    res = run_experiment(validate_config(tree), run_dir=tmp_path / "ft")
    assert res.metrics["init_from"]["new"] == 0


def test_init_from_another_family_is_refused(converted, tmp_path):
    _, bundle, data = converted
    tree = finetune_tree(tmp_path, bundle, data)
    tree["model"] = {"family": "transformer", "task": "generation", "init_from": str(bundle), "d_model": 64,
                     "n_heads": 4}
    with pytest.raises(ConfigError, match="'gpt' model; this config trains family 'transformer'"):
        run_experiment(validate_config(tree), run_dir=tmp_path / "r")


# ------------------------------------------------------------------------------------- the whole path, CLI
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_team_checkpoint_fine_tune_evaluate_serve_export(tmp_path, shared_data):
    from tests.serving_fakes import WAIT, ServerThread

    from chatforge.client import ChatbotClient
    from chatforge.serving.engine import Engine

    rows = list(csv.DictReader((shared_data / "chatbot_kr" / "ChatbotData.csv").open(encoding="utf-8")))[:64]
    pairs = [(r["Q"], r["A"]) for r in rows]
    data = write_pairs(tmp_path / "chatbot_slice.csv", pairs)
    ckpt = team_checkpoint(tmp_path / "kogpt2", [t for p in pairs for t in p], vocab_size=600, n_positions=96)
    runner = CliRunner()

    r = runner.invoke(app, ["convert", "from-hf", str(ckpt), str(tmp_path / "imported")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(SHIPPED), "--set", f"model.init_from={tmp_path / 'imported'}",
                            "--set", f"data.path={data}", "--set", f"output.dir={tmp_path / 'runs'}",
                            "--set", "output.run_name=ft", "--set", "tracking.enabled=false",
                            "--set", "train.epochs=20", "--set", "train.batch_size=8", "--set", "train.lr=3e-3",
                            "--set", "data.valid_fraction=0.0", "--set", "train.monitor=valid_loss",  # keep the last epoch
                            "--set", "data.test_fraction=0.1"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "ft"
    metrics = json.loads((run / "metrics.json").read_text())
    n = len(transformers.GPT2LMHeadModel.from_pretrained(str(ckpt)).state_dict())  # lm_head (tied) included
    assert metrics["init_from"] == {"loaded": n, "new": 0, "dropped": 0}
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < 0.6 * losses[0] and losses[:5] == sorted(losses[:5], reverse=True), losses
    bundle = run / "bundle"
    assert load_bundle(bundle).tokenizer.sha256 == _sha(ckpt / "tokenizer.json")

    r = runner.invoke(app, ["evaluate", str(bundle), "--split", "test", "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    report = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert 0.0 <= report["metrics"]["chrf"] <= 100.0

    # Serve it: Reply streams token ids that the checkpoint's own HF tokenizer decodes to the streamed text,
    # and they are the tokens transformers' greedy search picks with the exported model.
    r = runner.invoke(app, ["convert", "to-hf", str(bundle), str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    ref_tok = hf_tokenizer(tmp_path / "back")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "back")).eval()
    eot = ref_tok.convert_tokens_to_ids("<|endoftext|>")
    train_questions = [e.text for e in load_splits(load_config(run / "config.yaml"))[0][:4]]
    with ServerThread(Engine.from_bundles({"chat": bundle})) as st:
        st.wait_serving()
        with ChatbotClient(st.target, timeout=WAIT) as client:
            replies = {q: list(client.reply_stream(q, max_new_tokens=20)) for q in train_questions}
    for question, chunks in replies.items():
        ids = [c.token_id for c in chunks[:-1]]
        assert "".join(c.text for c in chunks[:-1]) == ref_tok.decode(ids)
        prompt = torch.tensor([[eot, *ref_tok(question)["input_ids"], eot]])  # <|endoftext|> q <|endoftext|>
        with torch.inference_mode():
            out = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        want = out[0, prompt.size(1):].tolist()
        assert ids == want[: want.index(eot) if eot in want else len(want)], question
    assert any(ref_tok.decode([c.token_id for c in chunks[:-1]]).strip() for chunks in replies.values())

    # to-hf round trip: transformers' logits equal the fine-tuned bundle's, and the tokenizer is the team's.
    b = load_bundle(bundle)
    x = torch.tensor([[eot, *ref_tok(SAMPLES[0])["input_ids"], eot, *ref_tok(pairs[0][1])["input_ids"]]])
    with torch.inference_mode():
        torch.testing.assert_close(b.model(x).logits, hf(x).logits, **FP32)
    for s in SAMPLES:
        assert ref_tok(s)["input_ids"] == hf_tokenizer(ckpt)(s)["input_ids"]
