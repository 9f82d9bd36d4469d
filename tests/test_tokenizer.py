import pytest

from chatforge.tokenizer import Tokenizer, TokenizerError, VocabTooLargeError

KO = ["안녕하세요 반갑습니다", "오늘 날씨가 정말 좋네요", "저는 챗봇입니다", "점심 뭐 먹을까요", "영화 보러 갈래요"]
EN = ["hello there how are you", "the weather is nice today", "i am a chatbot", "what should we eat", "let's see a movie"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train((KO + EN) * 20, vocab_size=70, character_coverage=1.0)


def test_special_token_contract(tok):
    s = tok.special
    assert (s.pad, s.bos, s.eos, s.unk) == (0, 1, 2, 3)
    assert tok.id_to_piece(s.cls) == "[CLS]" and tok.id_to_piece(s.sep) == "[SEP]"
    assert tok.id_to_piece(s.mask) == "[MASK]"
    assert len({s.cls, s.sep, s.mask}) == 3 and min(s.cls, s.sep, s.mask) > 3


@pytest.mark.parametrize("text", KO + EN + ["안녕하세요 and the weather 좋네요"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_mask_is_kept_whole_and_controls_are_not_produced(tok):
    ids = tok.encode("hello [MASK] there")
    assert tok.special.mask in ids
    assert tok.special.cls not in tok.encode("[CLS] hello")


def test_decode_skips_pad_bos_eos(tok):
    ids = tok.encode("hello there")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "hello there"


def test_incremental_decoder_matches_full_decode(tok):
    text = "오늘 날씨가 정말 좋네요 hello there"
    ids = tok.encode(text)
    d = tok.incremental_decoder()
    deltas = [d.feed(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert sum(1 for x in deltas if x) > 1  # text arrives in pieces, not all at the end


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_incremental_decoder_random_streams_match_full_decode(model_type):
    import random

    t = Tokenizer.train((KO + EN) * 20, vocab_size=70, model_type=model_type, character_coverage=1.0)
    rng = random.Random(0)
    for _ in range(200):  # any ids the model may emit, specials and <unk> included
        ids = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 40))]
        d = t.incremental_decoder()
        assert "".join(d.feed(i) for i in ids) == t.decode(ids), ids


def test_incremental_decoder_is_linear_in_reply_length(tok):
    """Each token decodes a window of a few pieces, not the whole reply (was O(T^2))."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.pieces = inner, 0

        def decode(self, ids):
            self.pieces += len(ids)
            return self.inner.decode(ids)

    ids = tok.encode(" ".join(EN + KO) * 8)
    counting = Counting(tok)
    from chatforge.tokenizer import IncrementalDecoder

    d = IncrementalDecoder(counting)
    assert "".join(d.feed(i) for i in ids) == tok.decode(ids)
    assert len(ids) > 200 and counting.pieces <= 8 * len(ids)  # the prefix decode: ~T^2/2 = 550,000


def test_bpe(tmp_path):
    t = Tokenizer.train((KO + EN) * 20, vocab_size=70, model_type="bpe", character_coverage=1.0)
    assert t.decode(t.encode("hello there")) == "hello there"
    t.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.encode("저는 챗봇입니다") == t.encode("저는 챗봇입니다")
    assert again.sha256 == t.sha256


def test_vocab_too_large_suggests_largest_workable_size():
    with pytest.raises(VocabTooLargeError) as e:
        Tokenizer.train(KO, vocab_size=5000)
    assert e.value.max_size and e.value.max_size < 5000
    assert str(e.value.max_size) in str(e.value)
    lowered = Tokenizer.train(KO, vocab_size=5000, on_vocab_too_large="lower")
    assert lowered.vocab_size <= e.value.max_size + 1


def test_errors():
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train(["", "  "], vocab_size=50)
    with pytest.raises(TokenizerError, match="allowed: unigram, bpe"):
        Tokenizer.train(KO, vocab_size=50, model_type="word")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load("/nonexistent/t.model")


def test_training_is_deterministic():
    a = Tokenizer.train((KO + EN) * 5, vocab_size=70, character_coverage=1.0)
    b = Tokenizer.train((KO + EN) * 5, vocab_size=70, character_coverage=1.0)
    assert a.sha256 == b.sha256


def test_vocab_too_small_says_how_small_it_may_be():
    with pytest.raises(TokenizerError, match=r"vocab_size=20 is smaller than the \d+ characters"):
        Tokenizer.train(KO * 5, vocab_size=20, character_coverage=1.0)


def test_join_turns_puts_the_latest_whole_turns_that_fit_before_the_message(tok):
    from chatforge.tokenizer import join_turns

    sep = tok.turn_sep_id
    assert sep == tok.special.sep != tok.eos_id  # [SEP] where the vocabulary has one
    a, b, msg = tok.encode(KO[0]), tok.encode(KO[1]), tok.encode(KO[2])
    assert tok.encode_with_context(KO[2]) == (msg, 0)
    assert tok.encode_with_context(KO[2], [KO[0], KO[1]], max_turns=0) == (msg, 0)  # a single-turn model
    assert tok.encode_with_context(KO[2], [KO[0], KO[1]], max_turns=2) == (a + [sep] + b + [sep] + msg, 2)
    assert tok.encode_with_context(KO[2], [KO[0], KO[1]], max_turns=1) == (b + [sep] + msg, 1)
    # The budget drops the oldest turn whole (never half a turn), and never cuts the message.
    assert tok.encode_with_context(KO[2], [KO[0], KO[1]], max_turns=2, budget=len(b) + 1 + len(msg)) == (
        b + [sep] + msg, 1)
    assert tok.encode_with_context(KO[2], [KO[0]], max_turns=2, budget=1) == (msg, 0)
    # Without a [SEP] (GPT-2's vocabulary) turns end with </s>.
    assert join_turns(lambda t: [len(t)], 2, "xyz", ["a", "bb"], max_turns=2) == ([1, 2, 2, 2, 3], 2)


def test_encode_batch_gives_encodes_ids_and_hands_only_long_lists_to_sentencepieces_threads(tok, monkeypatch):
    from chatforge import tokenizer as tokmod

    texts = ["안녕하세요 반가워요", "hello world", "", "오늘 날씨 어때?"] * 3
    expected = [tok.encode(t) for t in texts]
    lists = []
    real = tok.sp.encode

    class Spy:  # the SentencePiece processor, recording the calls that pass a whole list
        def __getattr__(self, name):
            return getattr(tok.sp_real, name)

        def encode(self, x, **kw):
            if isinstance(x, list):
                lists.append(len(x))
            return real(x, **kw)

    monkeypatch.setattr(tok, "sp_real", tok.sp, raising=False)
    monkeypatch.setattr(tok, "sp", Spy())
    assert tok.encode_batch(texts) == expected and lists == []  # a served call's few texts: one by one
    monkeypatch.setattr(tokmod, "THREADED_BATCH_MIN", 4)
    assert tok.encode_batch(texts) == expected and lists == [len(texts)]  # a corpus: SentencePiece's threads


def test_incremental_decoder_decodes_once_per_token(tok):
    """The served path runs the decoder once per streamed token: one SentencePiece decode each (the window's
    emitted text is remembered, a piece's own text is cached per id), where it took three."""

    class CountingSP:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def decode(self, ids):
            self.calls += 1
            return self.inner.decode(ids)

    ids = tok.encode(" ".join(EN + KO) * 4)
    expected = tok.decode(ids)
    counting = CountingSP(tok.sp)
    tok.sp = counting
    try:
        "".join(tok.incremental_decoder().feed(i) for i in ids)  # fills the per-id cache
        counting.calls = 0
        d = tok.incremental_decoder()
        assert "".join(d.feed(i) for i in ids) == expected
    finally:
        tok.sp = counting.inner
    assert len(ids) > 100 and counting.calls <= 1.05 * len(ids), (counting.calls, len(ids))


def test_sentencepiece_encodes_decomposed_hangul_as_composed(tok):
    """The ByteTokenizer and the estimator baselines compose NFD text (NFC) to match; SentencePiece's own NFKC rule
    already does, which this pins."""
    import unicodedata

    text = "안녕하세요 반가워요"
    assert tok.encode(unicodedata.normalize("NFD", text)) == tok.encode(text)
