"""ByteTokenizer (tokenizer.kind: byte): contract ids, round trips, streaming decode, files, config."""

import json
import random
import unicodedata

import pytest

from chatforge.config import ConfigError, validate_config
from chatforge.tokenizer import (
    BYTE_OFFSET,
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    TokenizerError,
    load_tokenizer,
)

KO = ["안녕하세요 반갑습니다", "오늘 날씨가 정말 좋네요", "헤어진 지 3년이 지났어"]
EN = ["hello there how are you", "let's see a movie!"]
EMOJI = ["😊", "좋아요 👍🏽 great", "👨‍👩‍👧 family", "🇰🇷 한국"]  # 4-byte, skin tone, ZWJ and flag sequences
TEXTS = KO + EN + EMOJI + ["", "mixed 한국어 and English 🎉 text", "é ß ∑ 𝔸"]


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def test_special_token_contract(tok):
    s = tok.special
    assert (s.pad, s.bos, s.eos, s.unk) == (0, 1, 2, 3) == (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
    assert [tok.id_to_piece(i) for i in (s.cls, s.sep, s.mask)] == ["[CLS]", "[SEP]", "[MASK]"]
    assert (s.cls, s.sep, s.mask) == (4, 5, 6) and BYTE_OFFSET == 7
    assert tok.vocab_size == BYTE_VOCAB_SIZE == 263 and tok.kind == "byte"
    # Byte ids are spelled like SentencePiece's byte-fallback pieces; the mapping is invertible.
    assert tok.id_to_piece(BYTE_OFFSET) == "<0x00>" and tok.id_to_piece(262) == "<0xFF>"
    assert all(tok.piece_to_id(tok.id_to_piece(i)) == i for i in range(tok.vocab_size))
    assert tok.piece_to_id("hello") == tok.unk_id
    with pytest.raises(TokenizerError, match="outside the byte tokenizer's vocabulary 0..262"):
        tok.id_to_piece(263)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids == [b + BYTE_OFFSET for b in text.encode("utf-8")]
    assert all(BYTE_OFFSET <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_korean_syllable_is_three_bytes(tok):
    assert len(tok.encode("안")) == 3 and len(tok.encode("😊")) == 4 and len(tok.encode("a")) == 1


def test_decomposed_hangul_encodes_as_composed(tok):
    nfd = unicodedata.normalize("NFD", "결혼 [MASK] 안녕")
    assert nfd.encode("utf-8") != "결혼 [MASK] 안녕".encode()  # different bytes before encoding
    assert tok.encode(nfd) == tok.encode("결혼 [MASK] 안녕")


def test_mask_is_kept_whole_and_controls_are_not_produced(tok):
    ids = tok.encode("hello [MASK] 세상")
    assert ids.count(tok.special.mask) == 1 and tok.decode(ids) == "hello [MASK] 세상"
    ids = tok.encode("[CLS] hi [SEP]")
    assert tok.special.cls not in ids and tok.special.sep not in ids and tok.decode(ids) == "[CLS] hi [SEP]"


def test_decode_skips_pad_bos_eos_and_replaces_invalid_bytes(tok):
    ids = tok.encode("안녕")
    assert tok.decode([tok.bos_id, ids[0], tok.pad_id, *ids[1:], tok.eos_id, tok.pad_id]) == "안녕"
    assert tok.decode(ids[:2]) == "\ufffd"  # truncated syllable
    assert tok.decode([0xFF + BYTE_OFFSET, *tok.encode("a")]) == "\ufffda"  # never valid in UTF-8
    assert tok.decode([*ids[:2], tok.special.mask, *ids]) == "\ufffd[MASK]안녕"  # a special ends the byte run
    assert tok.decode([tok.special.cls, *tok.encode("a"), tok.special.sep]) == "a"
    assert tok.decode([tok.unk_id]) == "\ufffd"
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([-1])


def _stream(tok, ids):
    dec = tok.incremental_decoder()
    return [dec.feed(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_emits_only_whole_characters(tok, text):
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    raw = text.encode("utf-8")
    for k in range(len(ids) + 1):
        # After k bytes the emitted text is exactly the complete characters among them.
        emitted = "".join(deltas[:k])
        complete = raw[:k].decode("utf-8", errors="ignore")
        assert emitted == complete, (text, k)


def test_incremental_decoder_random_streams_with_specials(tok):
    rng = random.Random(0)
    alphabet = "가나다라마바사아자차카타파하힣 abcxyz😊🎉👍🏽é∑"
    sp = tok.special
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        ids = tok.encode(text)
        # pad/bos/eos may appear anywhere (decoders skip them), even inside a character's bytes.
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randint(0, len(ids)), rng.choice([sp.pad, sp.bos, sp.eos]))
        deltas = _stream(tok, ids)
        assert "".join(deltas) == text == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_on_invalid_streams_matches_decode(tok):
    syllable = tok.encode("안")
    cases = [
        [0xFF + BYTE_OFFSET, *tok.encode("ok")],  # a byte that is never valid: replaced at once
        [*syllable[:2], tok.special.mask, *syllable],  # a special cuts a character: the cut bytes are replaced
        [*syllable[:1], *tok.encode("a")],  # an ASCII byte proves the pending sequence invalid
    ]
    for ids in cases:
        deltas = _stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids) and "\ufffd" in "".join(deltas)
    # An incomplete character at the end of a stream (cut by max_new_tokens) is never emitted.
    deltas = _stream(tok, [*tok.encode("네 "), *syllable[:2]])
    assert "".join(deltas) == "네 "


def test_save_load_and_load_tokenizer(tok, tmp_path):
    path = tmp_path / tok.filename
    tok.save(path)
    assert path.read_bytes() == tok.to_bytes() and json.loads(path.read_text())["kind"] == "byte"
    for loaded in (load_tokenizer(path, "byte"), ByteTokenizer.load(tmp_path)):
        assert isinstance(loaded, ByteTokenizer) and loaded.sha256 == tok.sha256
        assert loaded.encode("안녕 😊") == tok.encode("안녕 😊")
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json", "byte")
    with pytest.raises(TokenizerError, match="known: sentencepiece, byte, hf_tokenizers"):
        load_tokenizer(path, "chars")
    bad = json.loads(path.read_text())
    bad["byte_offset"] = 4
    path.write_text(json.dumps(bad))
    with pytest.raises(TokenizerError, match="byte_offset"):
        load_tokenizer(path, "byte")
    path.write_text("not json")
    with pytest.raises(TokenizerError, match="invalid JSON"):
        load_tokenizer(path, "byte")


def _tree(**tokenizer) -> dict:
    return {"name": "x", "data": {"path": "sample"}, "tokenizer": tokenizer,
            "model": {"family": "bytenet", "task": "generation"}}


def test_config_kind_byte():
    assert validate_config(_tree()).tokenizer.kind == "sentencepiece"
    cfg = validate_config(_tree(kind="byte"))
    assert cfg.tokenizer.kind == "byte" and cfg.tokenizer.vocab_size == BYTE_VOCAB_SIZE
    # The resolved config (as written to runs and bundles) validates again unchanged.
    assert validate_config(cfg.to_dict()).tokenizer == cfg.tokenizer
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=600.*not used with tokenizer.kind 'byte'.*263"):
        validate_config(_tree(kind="byte", vocab_size=600))
    with pytest.raises(ConfigError, match="on_vocab_too_large='lower'"):
        validate_config(_tree(kind="byte", on_vocab_too_large="lower"))
    with pytest.raises(ConfigError, match="path='x.model'"):
        validate_config(_tree(kind="byte", path="x.model"))
    with pytest.raises(ConfigError, match="kind"):
        validate_config(_tree(kind="chars"))
