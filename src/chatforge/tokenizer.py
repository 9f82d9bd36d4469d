"""SentencePiece tokenizer and the special-token contract shared by every family.

Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3; control symbols ``[CLS]`` and
``[SEP]`` (never produced by encoding text, only inserted by code); user-defined
``[MASK]`` (a piece the encoder keeps whole when it appears in text). Models, data
and decoders read these ids from here, never from literals (Kudo & Richardson 2018).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from chatforge.fileio import atomic_write_bytes
from chatforge.registry import SpecialIds

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
CONTROL_SYMBOLS = (CLS, SEP)
USER_DEFINED_SYMBOLS = (MASK,)


class TokenizerError(ValueError):
    pass


class VocabTooLargeError(TokenizerError):
    def __init__(self, requested: int, max_size: int | None):
        self.requested, self.max_size = requested, max_size
        hint = f"; the largest workable size for this corpus is {max_size}" if max_size else ""
        super().__init__(
            f"vocab_size={requested} is too large for this corpus{hint}. Lower tokenizer.vocab_size"
            " or set tokenizer.on_vocab_too_large=lower to use the largest workable size."
        )


class SpecialIdsMixin:
    """The special-token id accessors every tokenizer kind shares (reads ``self.special``)."""

    special: SpecialIds

    @property
    def pad_id(self) -> int:
        return self.special.pad

    @property
    def bos_id(self) -> int:
        return self.special.bos

    @property
    def eos_id(self) -> int:
        return self.special.eos

    @property
    def unk_id(self) -> int:
        return self.special.unk


class Tokenizer(SpecialIdsMixin):
    """A loaded SentencePiece model plus the special-token contract.

    Bundles may also carry a Hugging Face ``tokenizer.json`` (checkpoints converted
    with ``chatforge convert from-hf``); such tokenizers implement the same surface
    (``kind``, ``filename``, ``to_bytes``, ``special``, ``encode``/``decode``...) and are
    loaded through :func:`load_tokenizer`.
    """

    kind = "sentencepiece"
    filename = "tokenizer.model"

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path
        ids = {p: self.sp.piece_to_id(p) for p in (PAD, BOS, EOS, UNK, CLS, SEP, MASK)}
        expected = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
        for piece, want in expected.items():
            if ids[piece] != want:
                raise TokenizerError(
                    f"tokenizer {path or ''} breaks the special-token contract: {piece} has id {ids[piece]},"
                    f" chatforge requires {want}. Train it with `chatforge tokenizer train`."
                )
        # piece_to_id returns unk for unknown pieces; treat those as absent.
        self.special = SpecialIds(
            pad=0, bos=1, eos=2, unk=3,
            cls=ids[CLS] if ids[CLS] != 3 else None,
            sep=ids[SEP] if ids[SEP] != 3 else None,
            mask=ids[MASK] if ids[MASK] != 3 else None,
        )

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self._proto)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def to_bytes(self) -> bytes:
        return self._proto

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        *,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        character_coverage: float = 0.9995,
        on_vocab_too_large: str = "error",
        seed_sentencepiece_size: int = 1_000_000,
    ) -> Tokenizer:
        """Train a SentencePiece model in memory with chatforge's special tokens.

        When ``vocab_size`` is more than the corpus supports, SentencePiece names the
        largest workable size; we raise :class:`VocabTooLargeError` with it, or retrain
        at that size when ``on_vocab_too_large == "lower"`` (with a warning).
        """
        if model_type not in ("unigram", "bpe"):
            raise TokenizerError(f"model_type={model_type!r} is not supported; allowed: unigram, bpe")
        corpus = [s.strip() for s in sentences if s and s.strip()]
        if not corpus:
            raise TokenizerError("cannot train a tokenizer on an empty corpus")
        try:
            proto = _train_proto(corpus, vocab_size, model_type, character_coverage, seed_sentencepiece_size)
        except RuntimeError as e:
            max_size = _max_vocab_from_error(str(e))
            small = _MIN_RE.search(str(e))
            if small:
                raise TokenizerError(
                    f"vocab_size={vocab_size} is smaller than the {small.group(2)} characters and special pieces"
                    f" this corpus needs at character_coverage={character_coverage}; use vocab_size >= "
                    f"{small.group(2)} or lower character_coverage"
                ) from None
            if max_size is None:
                raise TokenizerError(f"SentencePiece training failed: {e}") from None
            if on_vocab_too_large != "lower":
                raise VocabTooLargeError(vocab_size, max_size) from None
            log.warning("vocab_size=%d is too large for this corpus; lowering to %d", vocab_size, max_size)
            proto = _train_proto(corpus, max_size, model_type, character_coverage, seed_sentencepiece_size)
        return cls(proto)

    # ------------------------------------------------------------------- coding
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without <s>/</s> (callers add them where their family needs them)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.special.pad, self.special.bos, self.special.eos}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


def load_tokenizer(path: str | Path, kind: str = "sentencepiece"):
    """Load a tokenizer file of the given kind ("sentencepiece" or "hf_tokenizers")."""
    if kind == "sentencepiece":
        return Tokenizer.load(path)
    if kind == "hf_tokenizers":
        from chatforge.interop.hf_tokenizer import HFTokenizer  # optional extra: chatforge[hf]

        return HFTokenizer.load(path)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; known: sentencepiece, hf_tokenizers")


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas for streaming replies.

    SentencePiece marks word starts with U+2581, so a piece's surface text depends
    on its position (the first piece loses its leading space). Decoding the whole
    prefix and emitting what was added is exact and cheap at reply lengths.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def feed(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.startswith(self.text):
            delta = text[len(self.text):]
        else:  # a later piece changed earlier text (rare); resend nothing wrong, only the tail
            common = os.path.commonprefix([text, self.text])
            delta = text[len(common):]
        self.text = text
        return delta


def _train_proto(corpus: list[str], vocab_size: int, model_type: str, coverage: float, seed_size: int) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=out,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=coverage,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
        control_symbols=list(CONTROL_SYMBOLS),
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        seed_sentencepiece_size=seed_size,
        # Deterministic for the same corpus: one thread, no sampling of the input.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


_MAX_RE = re.compile(r"value <= (\d+)")
_MIN_RE = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def _max_vocab_from_error(message: str) -> int | None:
    m = _MAX_RE.search(message)
    return int(m.group(1)) if m else None
