"""A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``) behind chatforge's tokenizer surface.

Converted checkpoints keep their own vocabulary: the bundle stores the checkpoint's
``tokenizer.json`` and records ``kind: hf_tokenizers`` in its metadata. The special-token contract
is read from the tokenizer's own special tokens, by their conventional spellings:

* ``pad``: ``[PAD]``/``<pad>``/``<|pad|>``; GPT-2 has none, so pad is ``</s>``'s id (HF's own
  convention). That is safe because chatforge only ever masks or ignores padding, and counts a
  row's length as its non-pad tokens of *raw text* ids, which never contain ``<|endoftext|>``.
* ``bos``/``eos``: ``<s>``/``</s>``, else ``<|endoftext|>`` (GPT-2 uses one token for both), else
  ``[CLS]``/``[SEP]`` (BERT).
* ``unk``: ``<unk>``/``[UNK]``, else ``eos`` (byte-level BPE never produces an unknown token).
* ``cls``/``sep``/``mask``: ``[CLS]``/``<cls>``, ``[SEP]``/``<sep>``, ``[MASK]``/``<mask>`` when present.

A vocabulary that spells them otherwise, or has none (the original openai-gpt has only
``<unk>``), names them explicitly: ``special_tokens={"bos": "<unk>", "eos": "<unk>"}``
(``chatforge convert from-hf --bos-token/--eos-token``). The bundle records such choices in
``metadata.json`` (``tokenizer.special_tokens``) and its loader passes them back.

``tokenizers`` is part of the optional extra ``chatforge[hf]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from chatforge.tokenizer import (
    IncrementalDecoder,
    JsonDocumentMixin,
    SpecialIds,
    SpecialIdsMixin,
    TokenizerError,
)

_PAD = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>")
_BOS = ("<s>", "<|endoftext|>", "[CLS]", "<|startoftext|>")
_EOS = ("</s>", "<|endoftext|>", "[SEP]")
_UNK = ("<unk>", "[UNK]", "<|unk|>")
_CLS = ("[CLS]", "<cls>")
_SEP = ("[SEP]", "<sep>")
_MASK = ("[MASK]", "<mask>")
SPECIAL_ROLES = ("pad", "bos", "eos", "unk", "cls", "sep", "mask")


class HFTokenizer(JsonDocumentMixin, SpecialIdsMixin):
    """Wraps a ``tokenizers.Tokenizer`` from ``tokenizer.json`` with :class:`chatforge.tokenizer.Tokenizer`'s
    surface: ``kind``, ``filename``, ``to_bytes``, ``special``, ``encode``/``decode``, ``sha256``."""

    kind = "hf_tokenizers"
    filename = "tokenizer.json"

    def __init__(self, json_bytes: bytes, path: str | None = None, *,
                 special_tokens: dict[str, str] | None = None):
        try:
            from tokenizers import (
                Tokenizer as _Tok,  # hf extra only: load_tokenizer reaches here for kind 'hf'
            )
        except ImportError as e:  # pragma: no cover - the extra is installed in dev/test
            raise TokenizerError(f"{e}. Install the extra: pip install 'chatforge[hf]'") from None
        self._json = json_bytes
        self.path = path
        bad = sorted(set(special_tokens or {}) - set(SPECIAL_ROLES))
        if bad:
            raise TokenizerError(f"unknown special-token role(s) {bad}; allowed: {', '.join(SPECIAL_ROLES)}")
        # Explicit choices (role -> token string) that override the conventional spellings.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self.tk = _Tok.from_str(json_bytes.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path or 'tokenizer.json'} is not a valid Hugging Face tokenizer: {e}") from None
        self.special = self._find_specials()

    def _find_specials(self) -> SpecialIds:
        vocab = self.tk.get_vocab(with_added_tokens=True)

        where = self.path or "tokenizer.json"
        for role, token in self.special_tokens.items():
            if token not in vocab:
                raise TokenizerError(f"{where}: the {role} token {token!r} is not in the vocabulary")

        def first(role: str, names: Iterable[str]) -> int | None:
            if role in self.special_tokens:
                return vocab[self.special_tokens[role]]
            return next((vocab[n] for n in names if n in vocab), None)

        bos, eos = first("bos", _BOS), first("eos", _EOS)
        if bos is None or eos is None:
            missing = " and ".join(r for r, i in (("begin-of-sequence (bos)", bos), ("end-of-sequence (eos)", eos))
                                   if i is None)
            raise TokenizerError(
                f"{where}: the vocabulary has no {missing} token; chatforge looks for one of {list(_BOS)} (bos) "
                f"and {list(_EOS)} (eos). Name the tokens to use, e.g. chatforge convert from-hf "
                f"--bos-token '<s>' --eos-token '</s>' (any token of the vocabulary)"
            )
        pad = first("pad", _PAD)
        unk = first("unk", _UNK)
        return SpecialIds(pad=eos if pad is None else pad, bos=bos, eos=eos, unk=eos if unk is None else unk,
                          cls=first("cls", _CLS), sep=first("sep", _SEP), mask=first("mask", _MASK))

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, *, special_tokens: dict[str, str] | None = None) -> HFTokenizer:
        path = cls._document(path, "Hugging Face tokenizer")
        return cls(path.read_bytes(), str(path), special_tokens=special_tokens)

    @classmethod
    def from_tokenizers(cls, tk, *, special_tokens: dict[str, str] | None = None) -> HFTokenizer:
        """From an in-memory ``tokenizers.Tokenizer`` (e.g. a fast HF tokenizer's backend)."""
        return cls(tk.to_str().encode("utf-8"), special_tokens=special_tokens)

    def token_strings(self) -> dict[str, str | None]:
        """The special tokens as strings (for writing an HF tokenizer_config.json)."""
        s = self.special
        return {name: (self.tk.id_to_token(i) if i is not None else None)
                for name, i in (("pad_token", s.pad), ("bos_token", s.bos), ("eos_token", s.eos),
                                ("unk_token", s.unk), ("cls_token", s.cls), ("sep_token", s.sep),
                                ("mask_token", s.mask))}

    # ------------------------------------------------------------------- coding
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids without the tokenizer's own post-processing (no [CLS]/[SEP] added)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.special.pad, self.special.bos, self.special.eos}
        return self.tk.decode([int(i) for i in ids if int(i) not in specials], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self.tk.id_to_token(int(i))
        if piece is None:
            raise TokenizerError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return piece

    def piece_to_id(self, piece: str) -> int:
        i = self.tk.token_to_id(piece)
        return self.special.unk if i is None else i

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)  # type: ignore[arg-type]  (same decode surface)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, special={json.dumps(self.special.__dict__)})"
