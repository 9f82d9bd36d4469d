"""SentencePiece tokenizer and the special-token contract shared by every family.

Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3; control symbols ``[CLS]`` and
``[SEP]`` (never produced by encoding text, only inserted by code); user-defined
``[MASK]`` (a piece the encoder keeps whole when it appears in text). Models, data
and decoders read these ids from here, never from literals (Kudo & Richardson 2018).

``tokenizer.kind: byte`` selects :class:`ByteTokenizer` instead: the same special ids, then the 256
UTF-8 byte values at fixed offsets. It has nothing to train and is stored as a small JSON file.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from chatforge.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
CONTROL_SYMBOLS = (CLS, SEP)
USER_DEFINED_SYMBOLS = (MASK,)


# Lists shorter than this are encoded one text per call (see Tokenizer.encode_batch): on this machine the list
# form was 17x slower for 1 text, 4.5x for 8 and 2.3x for 256, and faster from 1024 (0.75x; 0.44x at 8192).
THREADED_BATCH_MIN = 512

class TokenizerError(ValueError):
    pass


MIN_VOCAB_SIZE = 16  # the least tokenizer.vocab_size / --vocab-size accepts (7 ids are reserved)


class VocabTooLargeError(TokenizerError):
    def __init__(self, requested: int, max_size: int | None):
        self.requested, self.max_size = requested, max_size
        if max_size is not None and max_size < MIN_VOCAB_SIZE:
            # "lower tokenizer.vocab_size" cannot reach it: the setting's minimum is above what the corpus supports
            super().__init__(
                f"vocab_size={requested} is too large for this corpus, which supports only {max_size} pieces, fewer "
                f"than the smallest tokenizer.vocab_size ({MIN_VOCAB_SIZE}): train on more text, or set "
                f"tokenizer.on_vocab_too_large=lower to use {max_size}.")
            return
        hint = f"; the largest workable size for this corpus is {max_size}" if max_size else ""
        super().__init__(
            f"vocab_size={requested} is too large for this corpus{hint}. Lower tokenizer.vocab_size"
            " or set tokenizer.on_vocab_too_large=lower to use the largest workable size."
        )


@dataclass(frozen=True)
class SpecialIds:
    """The special-token contract, read from the tokenizer (never from literals)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    unk: int = 3
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None


def join_turns(encode: Callable[[str], list[int]], sep_id: int, text: str, context: Sequence[str] = (), *,
               max_turns: int = 0, budget: int | None = None) -> tuple[list[int], int]:
    """The ids of ``turn [SEP] turn [SEP] text``: the message after at most ``max_turns`` earlier turns of
    ``context`` (oldest first), each turn followed by ``sep_id``; returns (ids, turns used).

    Turns are added newest first and whole, while the total stays within ``budget`` tokens: the model
    always sees the message and the most recent context, never half a turn. The message itself is not
    cut here (callers apply their own limit: training truncates, serving rejects an over-long message).
    """
    ids = encode(text)
    used = 0
    if max_turns > 0:
        for turn in reversed(list(context)[-max_turns:]):
            piece = encode(turn) + [sep_id]
            if budget is not None and len(ids) + len(piece) > budget:
                break
            ids = piece + ids
            used += 1
    return ids, used


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

    @property
    def turn_sep_id(self) -> int:
        """What ends an earlier turn of a conversation: ``[SEP]``, or ``</s>`` for vocabularies without one
        (GPT-2's)."""
        return self.special.sep if self.special.sep is not None else self.special.eos

    def encode_with_context(self, text: str, context: Sequence[str] = (), *, max_turns: int = 0,
                            budget: int | None = None) -> tuple[list[int], int]:
        """:func:`join_turns` with this tokenizer's ``encode`` and turn delimiter."""
        return join_turns(self.encode, self.turn_sep_id, text, context, max_turns=max_turns, budget=budget)


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
        self._skip = frozenset((self.special.pad, self.special.bos, self.special.eos))  # what decode drops
        self._single: dict[int, str] = {}  # id -> decode([id]), for IncrementalDecoder (at most the vocabulary)

    def decode_one(self, token_id: int) -> str:
        """``decode([token_id])``, remembered per id: a streamed reply asks for it at almost every token."""
        text = self._single.get(token_id)
        if text is None:
            text = self._single[token_id] = self.decode([token_id])
        return text

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
        corpus = [nfc(s).strip() for s in sentences if s and s.strip()]  # as encode sees text (no NFKC inside)
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
        """Text -> ids of its NFC form, without <s>/</s> (callers add them where their family needs them). NFC here,
        not in SentencePiece: its default NFKC rule also folds Hangul compatibility jamo ("ㅋㅋ", "ㅠㅠ") into
        conjoining jamo, which replies then showed (see :func:`_train_proto`)."""
        return self.sp.encode(nfc(text), out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Texts -> ids, as :meth:`encode` gives each. SentencePiece's list form starts a thread pool per call:
        measured here 28-165 us (milliseconds on a busy machine) before the first text, where one text takes
        about 2 us, so the few texts of a served call go one by one and only long lists (training corpora)
        use the threads (``THREADED_BATCH_MIN``; benchmarks/tokenizer_batch.py)."""
        if len(texts) < THREADED_BATCH_MIN:
            return [self.sp.encode(nfc(t), out_type=int) for t in texts]
        return self.sp.encode([nfc(t) for t in texts], out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        skip = self._skip
        return self.sp.decode([i for i in map(int, ids) if i not in skip])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


TOKENIZER_KINDS = ("sentencepiece", "byte", "hf_tokenizers")


def load_tokenizer(path: str | Path, kind: str = "sentencepiece", *, special_tokens: dict[str, str] | None = None):
    """Load a tokenizer file of the given kind ("sentencepiece", "byte" or "hf_tokenizers").

    ``special_tokens`` (role -> token string, hf_tokenizers only) names special tokens the
    vocabulary does not spell conventionally; bundles record it in their metadata.
    """
    if special_tokens and kind != "hf_tokenizers":
        raise TokenizerError(f"special_tokens can only be chosen for hf_tokenizers tokenizers, not {kind!r}")
    if kind == "sentencepiece":
        return Tokenizer.load(path)
    if kind == "byte":
        return ByteTokenizer.load(path)
    if kind == "hf_tokenizers":
        from chatforge.interop.hf_tokenizer import HFTokenizer  # optional extra: chatforge[hf]

        return HFTokenizer.load(path, special_tokens=special_tokens)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZER_KINDS)}")


# ------------------------------------------------------------------ byte-level
# Ids 0..6 are the contract's special pieces in SentencePiece's order for chatforge models
# (pad, bos, eos, unk, then the control symbols, then the user-defined [MASK]); byte b is b + 7.
BYTE_SPECIAL_PIECES = (PAD, BOS, EOS, UNK, CLS, SEP, MASK)
BYTE_OFFSET = len(BYTE_SPECIAL_PIECES)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256
BYTE_FORMAT = 1
# <unk> is never produced by encoding (every byte has an id); a model may still generate it, and
# its surface is the replacement character, the byte-level meaning of "unknown".
BYTE_UNK_SURFACE = "\ufffd"
_MASK_SPLIT = re.compile(f"({re.escape(MASK)})")


class JsonDocumentMixin:
    """``save``/``to_bytes``/``sha256`` for tokenizers kept as one JSON document in ``self._json``
    (the byte tokenizer's layout, a Hugging Face ``tokenizer.json``)."""

    _json: bytes
    filename: str

    @classmethod
    def _document(cls, path: str | Path, what: str) -> Path:
        """The document's file: ``path`` itself, or ``cls.filename`` inside a folder."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.filename
        if not path.is_file():
            raise TokenizerError(f"{what} not found: {path}")
        return path

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self._json)

    def to_bytes(self) -> bytes:
        return self._json

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._json).hexdigest()


class ByteTokenizer(JsonDocumentMixin, SpecialIdsMixin):
    """UTF-8 bytes as tokens (the character-level setting of ByteNet, Kalchbrenner et al. 2016, and
    of byte-level LMs), behind :class:`Tokenizer`'s surface.

    Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, ``[CLS]``=4, ``[SEP]``=5 (control: never
    produced by encoding, decode to ""), ``[MASK]``=6 (user-defined: kept whole when it appears in
    text), then byte ``b`` = ``b + 7``; 263 ids in all. Pieces of byte ids are spelled
    ``<0xAB>`` like SentencePiece's byte-fallback pieces, so code that spells pieces into bytes
    (ByteNet's ``byte_table``) reads them unchanged.

    The vocabulary is fixed, so there is nothing to train; the file (``byte_tokenizer.json``)
    records the layout so a loader can check it matches this code.
    """

    kind = "byte"
    filename = "byte_tokenizer.json"

    def __init__(self, path: str | None = None):
        self.path = path
        self.special = SpecialIds(pad=0, bos=1, eos=2, unk=3, cls=4, sep=5, mask=6)
        self._json = self._layout_json()

    @staticmethod
    def _layout() -> dict:
        return {"kind": "byte", "format": BYTE_FORMAT, "special_pieces": list(BYTE_SPECIAL_PIECES),
                "byte_offset": BYTE_OFFSET, "vocab_size": BYTE_VOCAB_SIZE, "encoding": "utf-8"}

    @classmethod
    def _layout_json(cls) -> bytes:
        return (json.dumps(cls._layout(), indent=2) + "\n").encode("utf-8")

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        path = cls._document(path, "byte tokenizer file")
        try:
            got = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path} is not a byte tokenizer file (invalid JSON: {e})") from None
        want = cls._layout()
        if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items()):
            diff = {k: got.get(k) if isinstance(got, dict) else None for k, v in want.items()
                    if not isinstance(got, dict) or got.get(k) != v}
            raise TokenizerError(f"{path} does not describe chatforge's byte tokenizer: {diff} differ from the "
                                 f"layout this version reads: {want}")
        return cls(str(path))

    # ------------------------------------------------------------------- coding
    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Text -> one id per UTF-8 byte of its NFC form, without <s>/</s>; ``[MASK]`` in the text stays one id.
        NFC as the SentencePiece tokenizer's encode does: decomposed Hangul (NFD, as some systems
        send it) would otherwise be bytes the model never saw in training."""
        ids: list[int] = []
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        for part in _MASK_SPLIT.split(text):
            if part == MASK:
                ids.append(self.special.mask)
            elif part:
                ids.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _check_id(self, i: int) -> None:
        if not 0 <= i < BYTE_VOCAB_SIZE:
            raise TokenizerError(f"token id {i} is outside the byte tokenizer's vocabulary 0..{BYTE_VOCAB_SIZE - 1}")

    def _special_surface(self, i: int) -> str:
        if i == self.special.mask:
            return MASK
        if i == self.special.unk:
            return BYTE_UNK_SURFACE
        return ""  # [CLS]/[SEP]: control symbols have no surface (as in SentencePiece)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; <pad>/<s>/</s> are dropped, byte runs are UTF-8 decoded with errors="replace"
        (an invalid or truncated sequence becomes U+FFFD)."""
        skip = {self.special.pad, self.special.bos, self.special.eos}
        out: list[str] = []
        run = bytearray()
        for raw in ids:
            i = int(raw)
            self._check_id(i)
            if i in skip:
                continue
            if i >= BYTE_OFFSET:
                run.append(i - BYTE_OFFSET)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(self._special_surface(i))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        self._check_id(i)
        return BYTE_SPECIAL_PIECES[i] if i < BYTE_OFFSET else f"<0x{i - BYTE_OFFSET:02X}>"

    def piece_to_id(self, piece: str) -> int:
        if piece in BYTE_SPECIAL_PIECES:
            return BYTE_SPECIAL_PIECES.index(piece)
        m = _BYTE_PIECE_RE.fullmatch(piece)
        return int(m.group(1), 16) + BYTE_OFFSET if m else self.special.unk

    def incremental_decoder(self) -> ByteIncrementalDecoder:
        return ByteIncrementalDecoder(self)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={BYTE_VOCAB_SIZE})"


_BYTE_PIECE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ByteIncrementalDecoder:
    """Streams text from byte ids, emitting a character only once all of its bytes have arrived.

    Decoding the prefix and diffing (what :class:`IncrementalDecoder` does) would emit U+FFFD for
    the first byte of a 3-byte Korean syllable and then take it back; the stream has no way to take
    text back. Python's incremental UTF-8 decoder holds an incomplete sequence until it completes
    and replaces a sequence only once it is certainly invalid. A special id (``[MASK]``, ``<unk>``)
    ends the byte run, as in :meth:`ByteTokenizer.decode`, so the concatenated deltas equal
    ``decode(ids)`` except for an incomplete character at the very end, which is never emitted
    (a reply cut by ``max_new_tokens`` mid-character loses that character rather than showing U+FFFD).
    """

    def __init__(self, tokenizer: ByteTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        i = int(token_id)
        self.tok._check_id(i)
        self.ids.append(i)
        sp = self.tok.special
        if i in (sp.pad, sp.bos, sp.eos):
            delta = ""
        elif i >= BYTE_OFFSET:
            delta = self._utf8.decode(bytes([i - BYTE_OFFSET]))
        else:  # a special piece ends the byte run: pending bytes were an invalid sequence
            delta = self._utf8.decode(b"", final=True) + self.tok._special_surface(i)
            self._utf8.reset()
        self.text += delta
        return delta


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas for streaming replies, in O(1) per token.

    SentencePiece marks word starts with U+2581, so a piece's surface text depends on its
    position (the first piece of a decode loses its leading space). Decoding the whole prefix
    for every token is exact but O(T^2) over a reply. Instead two offsets bound a window: the
    text of ``ids[prefix:read]`` was emitted already, and the delta is what decoding
    ``ids[prefix:]`` adds to it. Both decodes start at the same piece, so they drop the same
    leading space and their difference is exactly the new text (a window only starts at a piece
    with visible text of its own, see ``_anchors``). A delta that ends in U+FFFD
    (an incomplete UTF-8 sequence from byte pieces) is held back until the character is whole.

    One SentencePiece decode per token: the window's emitted text is remembered from the token
    before (``_done``), and a piece's text alone (``_anchors``, and the new window after an anchor) is
    the tokenizer's ``decode_one`` where it has one. The served path runs this once per streamed token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the pieces before it never change the text again
        self.read = 0  # ids[:read] are emitted
        self._done: str | None = ""  # decode(ids[prefix:read]), None when not known yet
        single = getattr(tokenizer, "decode_one", None)
        self._one = single if single is not None else (lambda i: tokenizer.decode([i]))

    def feed(self, token_id: int) -> str:
        ids = self.ids
        ids.append(int(token_id))
        done = self._done
        if done is None:
            done = self._done = self.tok.decode(ids[self.prefix:self.read])
        text = self.tok.decode(ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd") or not text.startswith(done):
            return ""  # nothing visible yet, or a character still incomplete
        read = len(ids)
        if self._anchors(ids[self.read]):
            # The new window is ids[old read:]: one piece (the usual case) is that piece's text alone.
            self.prefix = self.read
            self._done = self._one(ids[self.prefix]) if read - self.prefix == 1 else None
        else:
            self._done = text
        self.read = read
        return text[len(done):]

    def _anchors(self, token_id: int) -> bool:
        """Can a window start at this piece? Only if it shows text of its own: a decode drops
        *all* leading whitespace (``decode(["▁", "▁"]) == ""``) and skips specials, so a window
        starting at one would lose the spaces the full text has."""
        alone = self._one(token_id)
        return bool(alone) and not alone.isspace()


def nfc(text: str) -> str:
    """``text`` in Unicode NFC (returned as it is when it already is)."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _train_proto(corpus: list[str], vocab_size: int, model_type: str, coverage: float, seed_size: int) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # No Unicode folding inside SentencePiece (its default, nmt_nfkc, is NFKC): NFKC turns the Hangul
        # compatibility jamo of Korean chat ("ㅋㅋ", "ㅠㅠ", U+3131-318E) into conjoining jamo (U+1100-11FF), so
        # replies came back as "ᄏᄏ". Text is NFC (the readers, and encode above); whitespace is still collapsed.
        normalization_rule_name="identity",
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
