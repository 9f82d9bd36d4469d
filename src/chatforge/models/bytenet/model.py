"""ByteNet (Kalchbrenner et al. 2016, "Neural Machine Translation in Linear Time"): a source network
of dilated non-causal residual conv blocks with a target network of dilated causal (masked) conv
blocks stacked on its output, target-aligned, with dynamic unfolding of the target length.

Registered as family ``bytenet`` for the task ``generation``. Inputs are the tokenizer's ids
(subword pieces; a SentencePiece model trained with small vocabularies approaches characters),
so bundles serve through :class:`chatforge.inference.Seq2SeqGenerator` like the Transformer's.

``input_unit`` (config) chooses what the *source* network reads:

``subword`` (default)
    one position per tokenizer piece.
``byte``
    one position per UTF-8 byte of the source text, as in the paper's character-level models.
    The model still takes tokenizer ids (every pipeline, the decoder and the serving wrappers hand
    it ids) and spells them into bytes itself through a ``byte_table`` buffer built from the
    tokenizer's pieces at build time (SentencePiece's ``▁`` is the space byte; special pieces
    become one reserved symbol). The buffer is saved with the weights, so bundles carry it.

The *target* side is always the tokenizer's pieces, in both modes: generation must yield tokenizer
ids for streaming and decoding. With byte sources, target step t reads source *byte* position t,
so ``unfold_a`` should roughly be pieces per byte (e.g. 0.4), not 1.2.

Byte-level on both sides, as in the paper, is the tokenizer's choice, not the model's:
``tokenizer.kind: byte`` (:class:`chatforge.tokenizer.ByteTokenizer`) makes every id a UTF-8 byte, so
sources, targets and generation are all bytes with ``input_unit: subword`` (the default: one position
per id) and ``unfold_a`` near 1. ``input_unit: byte`` together with a byte tokenizer is rejected at
build time: it would spell bytes into the same bytes through a second, redundant embedding table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.models.bytenet.config import ByteNetConfig
from chatforge.models.outputs import ModelOutput
from chatforge.modules.dilated_conv import ConvCache, DilatedConvStack, dilation_schedule
from chatforge.registry import BuildContext
from chatforge.tasks import IGNORE_INDEX

logger = logging.getLogger(__name__)


# Source-side byte symbols when input_unit == "byte": 0 is padding, 1 stands for any special
# piece (<unk>, <s>, [SEP], ...), byte b is b + BYTE_OFFSET.
BYTE_PAD, BYTE_SPECIAL, BYTE_OFFSET = 0, 1, 2
BYTE_VOCAB = 256 + BYTE_OFFSET
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def spell_bytes(pieces: Sequence[str], special_ids: Iterable[int] = ()) -> tuple[Tensor, Tensor]:
    """UTF-8 spelling of every piece: (table (V, L) of byte symbols right-padded with BYTE_PAD,
    lengths (V,)). ``special_ids`` map to one BYTE_SPECIAL symbol (the caller zeroes padding's
    length); ``▁`` is a space; byte-fallback pieces ``<0xAB>`` are their byte."""
    special = set(special_ids)
    spelled: list[list[int]] = []
    for i, piece in enumerate(pieces):
        if i in special:
            spelled.append([BYTE_SPECIAL])
            continue
        m = _BYTE_PIECE.fullmatch(piece)
        raw = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        spelled.append([b + BYTE_OFFSET for b in raw] or [BYTE_SPECIAL])
    width = max(len(b) for b in spelled)
    table = torch.full((len(pieces), width), BYTE_PAD, dtype=torch.long)
    for i, b in enumerate(spelled):
        table[i, : len(b)] = torch.tensor(b)
    return table, torch.tensor([len(b) for b in spelled], dtype=torch.long)


@dataclass
class ByteNetState:
    """Decoding state: source conditioning for every target step plus conv ring buffers (cached)
    or the token history (uncached reference)."""

    source: Tensor  # (B, U, D) source representation per target position; zeros past |t^|
    caches: list[ConvCache] | None
    history: Tensor | None  # (B, t)
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.source.size(0)

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder batch rows (beam search, finished rows)."""
        index = index.to(self.source.device)
        self.source = self.source.index_select(0, index)
        if self.caches is not None:
            for c in self.caches:
                c.reorder(index)
        if self.history is not None:
            self.history = self.history.index_select(0, index)


class ByteNet(nn.Module):
    """ByteNet encoder-decoder (Kalchbrenner et al. 2016, sections 3.1-3.4, figure 1).

    ``forward`` is teacher-forced training; ``init_state``/``decode_step`` is the incremental
    interface of :mod:`chatforge.decoding`, with a ring-buffer cache per causal conv.
    """

    def __init__(self, cfg: ByteNetConfig, vocab_size: int, pad_id: int, *, pieces: Sequence[str] | None = None,
                 special_ids: Iterable[int] = ()):
        """``pieces`` (the tokenizer's piece of every id) and ``special_ids`` are needed, and only
        used, when ``cfg.input_unit == "byte"``."""
        super().__init__()
        self.cfg, self.pad_id, self.max_len = cfg, pad_id, cfg.max_len
        d = cfg.d_model
        self.byte_input = cfg.input_unit == "byte"
        if self.byte_input:
            if pieces is None or len(pieces) != vocab_size:
                got = "none" if pieces is None else f"{len(pieces)}"
                raise ValueError(f"input_unit 'byte' needs the tokenizer's {vocab_size} pieces to spell ids "
                                 f"as bytes; got {got} (build through the registry with a tokenizer)")
            table, lengths = spell_bytes(pieces, set(special_ids) - {pad_id})
            lengths[pad_id] = 0  # padding spells to nothing
            self.register_buffer("byte_table", table)  # (V, L)
            self.register_buffer("byte_len", lengths)  # (V,)
        self.src_pad = BYTE_PAD if self.byte_input else pad_id
        self.src_embed = nn.Embedding(BYTE_VOCAB if self.byte_input else vocab_size, d, padding_idx=self.src_pad)
        self.tgt_embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        for emb, pad in ((self.src_embed, self.src_pad), (self.tgt_embed, pad_id)):
            nn.init.normal_(emb.weight, std=d**-0.5)
            with torch.no_grad():
                emb.weight[pad].zero_()
        self.encoder = DilatedConvStack(d, cfg.encoder_kernel_size,
                                        dilation_schedule(cfg.max_dilation, cfg.encoder_sets), False, cfg.dropout)
        self.decoder = DilatedConvStack(d, cfg.decoder_kernel_size,
                                        dilation_schedule(cfg.max_dilation, cfg.decoder_sets), True, cfg.dropout)
        self.enc_norm = nn.LayerNorm(d)
        self.out_norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def encoder_receptive_field(self) -> int:
        return self.encoder.receptive_field

    @property
    def decoder_receptive_field(self) -> int:
        return self.decoder.receptive_field

    def unfolded_length(self, source_len: Tensor) -> Tensor:
        """|t^| = floor(a * |s| + b) per row (paper section 3.2), source_len (B,) -> (B,)."""
        return torch.floor(source_len.double() * self.cfg.unfold_a + self.cfg.unfold_b).long().clamp(min=1)

    def to_bytes(self, input_ids: Tensor) -> Tensor:
        """Tokenizer ids (B, S) right-padded -> byte symbols (B, N) right-padded with BYTE_PAD,
        each row the concatenated spelling of its pieces (N = the longest row)."""
        spelled = self.byte_table[input_ids]  # (B, S, L)
        keep = torch.arange(spelled.size(2), device=input_ids.device) < self.byte_len[input_ids][..., None]
        flat, keep = spelled.flatten(1), keep.flatten(1)  # (B, S*L)
        n = int(keep.sum(1).max())
        # Kept bytes go to their rank among the row's kept bytes; the rest to a spill column n.
        pos = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(flat, n))
        out = flat.new_full((flat.size(0), n + 1), BYTE_PAD).scatter_(1, pos, flat)
        return out[:, :n].contiguous()  # (B, N)

    def encode(self, input_ids: Tensor, target_len: int | None = None) -> Tensor:
        """input_ids (B, S) right-padded -> source representation (B, U, D), zero past each row's |t^|.

        U covers the longest |t^| and, if given, ``target_len`` (the positions the target network
        will read); the source network sees each row's tokens (bytes with input_unit 'byte'), then
        zeros up to its |t^|.
        """
        if self.byte_input:
            input_ids = self.to_bytes(input_ids)  # (B, N): source positions are bytes from here on
        src_len = (input_ids != self.src_pad).sum(1)  # (B,)
        unfold = self.unfolded_length(src_len)  # (B,)
        u = max(int(unfold.max()), input_ids.size(1), target_len or 0)
        ids = F.pad(input_ids, (0, u - input_ids.size(1)), value=self.src_pad)  # (B, U)
        pos = torch.arange(u, device=ids.device)[None]  # (1, U)
        active = pos < unfold[:, None]  # (B, U): the unfolded region of each row
        x = self.dropout(self.src_embed(ids))  # (B, U, D); pad embeddings are zero
        h = self.encoder(x, active)
        return self.enc_norm(h) * active.unsqueeze(-1).to(h.dtype)

    def _decode_full(self, source: Tensor, decoder_input_ids: Tensor) -> Tensor:
        t = decoder_input_ids.size(1)
        y = self.dropout(self.tgt_embed(decoder_input_ids)) + source[:, :t]  # target-aligned stacking
        return self.lm_head(torch.relu(self.out_norm(self.decoder(y))))  # (B, T, V)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, S), decoder_input_ids (B, T) starting with <s>, labels (B, T) (-100 ignored)
        -> logits (B, T, V)."""
        source = self.encode(input_ids, decoder_input_ids.size(1))
        logits = self._decode_full(source, decoder_input_ids)
        loss, losses = None, {}
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, label_smoothing=self.cfg.label_smoothing)
            losses["lm"] = loss
        return ModelOutput(logits=logits, loss=loss, losses=losses)

    # ---- incremental decoding interface (see chatforge.decoding) ----

    def init_state(self, input_ids: Tensor, use_cache: bool = True) -> ByteNetState:
        if input_ids.dim() != 2 or input_ids.size(1) == 0:
            raise ValueError(f"input_ids must be a non-empty (B, S) tensor; got shape {tuple(input_ids.shape)}")
        if not (input_ids != self.pad_id).any(-1).all():
            raise ValueError("every source row needs at least one non-pad token")
        source = self.encode(input_ids)
        caches = self.decoder.new_cache(input_ids.size(0), source.device, source.dtype) if use_cache else None
        history = None if use_cache else input_ids.new_empty((input_ids.size(0), 0))
        return ByteNetState(source=source, caches=caches, history=history)

    def _source_at(self, state: ByteNetState, t: int) -> Tensor:
        if t < state.source.size(1):
            return state.source[:, t : t + 1]  # (B, 1, D)
        return state.source.new_zeros(state.source.size(0), 1, state.source.size(2))  # unfolded past |t^|

    def decode_step(self, tokens: Tensor, state: ByteNetState) -> Tensor:
        """tokens (B, 1) -> next-token logits (B, V); O(layers) with the cache."""
        if tokens.dim() != 2 or tokens.size(1) != 1 or tokens.size(0) != state.batch_size:
            raise ValueError(f"tokens must have shape ({state.batch_size}, 1); got {tuple(tokens.shape)}")
        if state.caches is not None:
            y = self.tgt_embed(tokens) + self._source_at(state, state.length)  # (B, 1, D)
            y = self.decoder.step(y, state.caches)
            logits = self.lm_head(torch.relu(self.out_norm(y)))[:, 0]
        else:
            state.history = torch.cat([state.history, tokens], dim=1)  # (B, t+1)
            t = state.history.size(1)
            source = state.source
            if source.size(1) < t:
                source = F.pad(source, (0, 0, 0, t - source.size(1)))
            logits = self._decode_full(source, state.history)[:, -1]
        state.length += 1
        return logits  # (B, V)


def build(cfg: ByteNetConfig, ctx: BuildContext) -> nn.Module:
    """Builder for the registry: ``generation`` -> :class:`ByteNet`."""
    if ctx.task != "generation":
        raise ValueError(f"bytenet does not support task {ctx.task!r}; supported: generation")
    pieces = None
    if cfg.input_unit == "byte":
        tok = ctx.tokenizer
        if getattr(tok, "kind", None) == "byte":
            raise ValueError("model.input_unit 'byte' spells subword pieces into bytes, but tokenizer.kind 'byte' "
                             "already makes every id a byte (source and target); remove model.input_unit (or set "
                             "it to 'subword'), or use tokenizer.kind 'sentencepiece' for byte sources only")
        if tok is None:
            raise ValueError("bytenet with input_unit 'byte' needs the tokenizer in BuildContext (to spell its "
                             "pieces as bytes); use input_unit 'subword' or pass BuildContext(tokenizer=...)")
        pieces = [tok.id_to_piece(i) for i in range(ctx.vocab_size)]
    sp = ctx.special
    specials = [i for i in (sp.pad, sp.bos, sp.eos, sp.unk, sp.cls, sp.sep, sp.mask) if i is not None]
    model = ByteNet(cfg, ctx.vocab_size, sp.pad, pieces=pieces, special_ids=specials)
    logger.debug("bytenet: %d source / %d target layers, receptive fields %d / %d", len(model.encoder.blocks),
                 len(model.decoder.blocks), model.encoder_receptive_field, model.decoder_receptive_field)
    return model


__all__ = ["ByteNet", "ByteNetConfig", "ByteNetState", "spell_bytes"]
