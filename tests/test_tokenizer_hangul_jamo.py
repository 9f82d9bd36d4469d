"""SentencePiece tokenizers keep Korean chat's Hangul compatibility jamo ("ㅋㅋ", "ㅠㅠ"): the default NFKC rule turned
them into conjoining jamo (U+110F ...), so every reply, table and evaluation showed "ᄏᄏ" for "ㅋㅋ". Decomposed
Hangul (NFD) still encodes as the composed text, now by NFC in encode."""

from __future__ import annotations

import unicodedata

import pytest

from chatforge.tokenizer import Tokenizer

CORPUS = ["ㅋㅋㅋ 진짜 웃기다", "ㅠㅠ 너무 슬퍼요", "안녕하세요 반가워요", "ㅎㅎ 고마워요"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=48, on_vocab_too_large="lower")


@pytest.mark.parametrize("text", ["ㅋㅋㅋ", "ㅠㅠ 너무 슬퍼요", "ㅎㅎ 고마워요"])
def test_compatibility_jamo_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_decomposed_hangul_encodes_as_composed(tok):
    text = "안녕하세요 반가워요"
    assert tok.encode(unicodedata.normalize("NFD", text)) == tok.encode(text)
    assert tok.encode_batch([unicodedata.normalize("NFD", text)] * 600) == [tok.encode(text)] * 600  # threaded path


def test_a_decomposed_corpus_trains_the_same_tokenizer_as_the_composed_one(tok):
    nfd = Tokenizer.train([unicodedata.normalize("NFD", t) for t in CORPUS], vocab_size=48, on_vocab_too_large="lower")
    assert nfd.vocab_size == tok.vocab_size
    assert [nfd.id_to_piece(i) for i in range(nfd.vocab_size)] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    text = "ㅋㅋㅋ 진짜 웃기다"
    assert nfd.encode(unicodedata.normalize("NFD", text)) == tok.encode(text)


def test_subword_sampling_composes_decomposed_text_too(tok):
    from chatforge.tasks import SubwordSampler

    text = "안녕하세요 반가워요"
    sampler = SubwordSampler(tok, alpha=1.0)
    assert all(tok.decode(sampler.encode(unicodedata.normalize("NFD", text))) == text for _ in range(5))
