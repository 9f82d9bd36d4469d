"""The Transformer (Vaswani et al. 2017, "Attention Is All You Need"): encoder-decoder for
reply generation, and its encoder alone with a pooled head for intent classification.

Registered as family ``transformer`` for the tasks ``generation`` and ``classification``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.models.outputs import ModelOutput
from chatforge.models.transformer.config import TransformerConfig
from chatforge.modules import (
    DecoderLayerCache,
    SinusoidalPositionalEmbedding,
    TokenEmbedding,
    TransformerDecoder,
    TransformerEncoder,
    causal_mask,
    load_stack_from_torch,
    padding_mask,
)
from chatforge.modules.scripted import attach_scripted_step, plain_executor
from chatforge.registry import BuildContext
from chatforge.tasks import IGNORE_INDEX

logger = logging.getLogger(__name__)



def _init_linear(module: nn.Module) -> None:
    # Xavier-uniform for projection matrices, as torch.nn.Transformer and the reference code do.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class Seq2SeqState:
    """Decoding state for one batch: the encoded source plus either KV caches or the token history.

    With caches (``use_cache=True``) each ``decode_step`` runs the decoder on the new token only;
    without, ``history`` keeps every fed token and the whole prefix is recomputed (the reference).
    """

    memory: Tensor  # (B, S, D)
    memory_mask: Tensor  # (B, 1, 1, S)
    caches: list[DecoderLayerCache] | None
    history: Tensor | None  # (B, t) tokens fed so far when uncached
    length: int = 0  # decoder positions consumed so far

    @property
    def batch_size(self) -> int:
        return self.memory.size(0)

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder batch rows (``index`` into the current batch), e.g. drop finished rows."""
        index = index.to(self.memory.device)
        self.memory = self.memory.index_select(0, index)
        self.memory_mask = self.memory_mask.index_select(0, index)
        if self.caches is not None:
            for c in self.caches:
                c.reorder(index)
        if self.history is not None:
            self.history = self.history.index_select(0, index)


class TransformerSeq2Seq(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al. 2017, sections 3.1-3.5) with a LM head.

    ``forward`` is teacher-forced training; ``init_state``/``decode_step`` is the incremental
    interface that :mod:`chatforge.decoding` drives.
    """

    def __init__(self, cfg: TransformerConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.max_len = cfg.max_len
        d = cfg.d_model
        self.src_embed = TokenEmbedding(vocab_size, d, padding_idx=pad_id)
        self.tgt_embed = self.src_embed if cfg.tie_embeddings else TokenEmbedding(vocab_size, d, padding_idx=pad_id)
        self.positions = SinusoidalPositionalEmbedding(cfg.max_len, d)
        self.dropout = nn.Dropout(cfg.dropout)
        layer_args = (d, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.activation, cfg.norm_first)
        self.encoder = TransformerEncoder(cfg.num_encoder_layers, *layer_args)
        self.decoder = TransformerDecoder(cfg.num_decoder_layers, *layer_args)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        _init_linear(self.encoder)
        _init_linear(self.decoder)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight  # paper section 3.4: one matrix, three uses
        else:
            nn.init.normal_(self.lm_head.weight, std=d**-0.5)

    # The scripted decoding step (use_scripted_step), kept out of the module tree: not a submodule, so it is in no
    # state_dict and no .to(); it reads the weights as they were when it was built.
    _scripted_step: torch.jit.ScriptModule | None = None

    def use_scripted_step(self, enable: bool = True) -> str | None:
        """Decode continuous-batching steps (``Seq2SeqStepModel.step``/``verify``) with the TorchScript step of
        :mod:`chatforge.models.transformer.scripted` (the same logits; the GIL given up for the whole step), for
        inference: build it after the last change to the weights. Returns None when it is used, else why not (the
        model then decodes eagerly); ``enable=False`` drops it."""
        from chatforge.models.transformer.scripted import script_decoder, scriptable

        return attach_scripted_step(self, scriptable, script_decoder, enable)

    def _usable_step(self, device_type: str, caches: list[DecoderLayerCache] | None = None):
        """The scripted step when it may be used now: built, in eval mode, not under autocast, and (``caches``)
        every cache filled; else None."""
        scripted = self._scripted_step
        if scripted is None or self.training or torch.is_autocast_enabled(device_type):
            return None
        if caches is not None and any(c.self_attn.k is None or c.cross_attn.k is None for c in caches):
            return None
        return scripted

    @staticmethod
    def _cache_tensors(caches: list[DecoderLayerCache]) -> tuple[list[Tensor], ...]:
        return ([c.self_attn.k for c in caches], [c.self_attn.v for c in caches],
                [c.cross_attn.k for c in caches], [c.cross_attn.v for c in caches])

    @staticmethod
    def _store_self(caches: list[DecoderLayerCache], keys: list[Tensor], values: list[Tensor]) -> None:
        for c, k, v in zip(caches, keys, values, strict=True):
            c.self_attn.k, c.self_attn.v = k, v

    def scripted_logits(self, tokens: Tensor, positions: Tensor, self_mask: Tensor | None,
                        memory_mask: Tensor | None, caches: list[DecoderLayerCache]) -> Tensor | None:
        """Logits (B, T, V) of ``tokens`` (B, T) at decoder ``positions`` (B, T) over the caches, whose
        self-attention keys and values gain the T positions, from the scripted step; None (nothing done) when
        there is none to use: not built, in training mode, under autocast, or caches not filled yet."""
        scripted = self._usable_step(tokens.device.type, caches)
        if scripted is None:
            return None
        with plain_executor():
            logits, keys, values = scripted(tokens, positions, self_mask, memory_mask, *self._cache_tensors(caches))
        self._store_self(caches, keys, values)
        return logits

    def scripted_step_aligned(self, tokens: Tensor, lens: Tensor, memory_mask: Tensor,
                              caches: list[DecoderLayerCache]) -> tuple[Tensor, Tensor] | None:
        """One token per row (``tokens`` (B,)) at decoder positions ``lens`` (B,) over right-aligned caches (row i's
        keys: its last ``lens[i]`` columns), the mask built in the graph -> (logits (B, V), ``lens + 1``); the caches
        gain the position. None (nothing done) when there is no scripted step to use (see :meth:`scripted_logits`)."""
        scripted = self._usable_step(tokens.device.type, caches)
        if scripted is None:
            return None
        with plain_executor():
            logits, keys, values, lens = scripted.step_aligned(tokens, lens, memory_mask, *self._cache_tensors(caches))
        self._store_self(caches, keys, values)
        return logits, lens

    def scripted_prefill(self, input_ids: Tensor, bos: Tensor) -> tuple[Tensor, Seq2SeqState] | None:
        """``init_state(input_ids)`` then ``decode_step(bos, state)`` (bos (B, 1)) from the scripted step's graph: the
        same logits (B, V) and state, bit for bit; None (nothing done) when there is none to use."""
        scripted = self._usable_step(input_ids.device.type)
        if scripted is None:
            return None
        self._check_source(input_ids)
        mask = padding_mask(input_ids, self.pad_id)
        with plain_executor():
            logits, memory, keys, values, cross_k, cross_v = scripted.prefill(input_ids, mask, bos)
        caches = self.decoder.new_cache()
        self._store_self(caches, keys, values)
        for c, kc, vc in zip(caches, cross_k, cross_v, strict=True):
            c.cross_attn.k, c.cross_attn.v = kc, vc
        return logits, Seq2SeqState(memory=memory, memory_mask=mask, caches=caches, history=None, length=1)

    def _embed(self, embed: TokenEmbedding, ids: Tensor, offset: int = 0) -> Tensor:
        return self.dropout(embed(ids) + self.positions(ids.size(1), offset))  # (B, T, D)

    def encode(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids (B, S) -> (memory (B, S, D), source padding mask (B, 1, 1, S))."""
        mask = padding_mask(input_ids, self.pad_id)
        return self.encoder(self._embed(self.src_embed, input_ids), mask), mask

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, S), decoder_input_ids (B, T) (right-padded, starting with <s>),
        labels (B, T) with -100 where ignored -> logits (B, T, V)."""
        memory, mem_mask = self.encode(input_ids)
        t = decoder_input_ids.size(1)
        # Causal masking alone suffices for right-padded decoder inputs: real positions never see
        # later pads, and outputs at pad positions are ignored by the loss (-100).
        y = self.decoder(self._embed(self.tgt_embed, decoder_input_ids), memory,
                         self_mask=causal_mask(t, device=memory.device), memory_mask=mem_mask)
        logits = self.lm_head(y)  # (B, T, V)
        loss = None
        losses: dict[str, Tensor] = {}
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, label_smoothing=self.cfg.label_smoothing)
            losses["lm"] = loss
        return ModelOutput(logits=logits, loss=loss, losses=losses)

    # ---- incremental decoding interface (see chatforge.decoding) ----

    def _check_source(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.size(1) == 0:
            raise ValueError(f"input_ids must be a non-empty (B, S) tensor; got shape {tuple(input_ids.shape)}")
        if input_ids.size(1) > self.max_len:
            raise ValueError(f"input has {input_ids.size(1)} tokens; the model's max_len is {self.max_len}")
        if not padding_mask(input_ids, self.pad_id).any(-1).all():
            raise ValueError("every source row needs at least one non-pad token")

    def init_state(self, input_ids: Tensor, use_cache: bool = True) -> Seq2SeqState:
        """Encode the source once; input_ids (B, S), right-padded with pad_id."""
        self._check_source(input_ids)
        memory, mask = self.encode(input_ids)
        return Seq2SeqState(
            memory=memory,
            memory_mask=mask,
            caches=self.decoder.new_cache() if use_cache else None,
            history=None if use_cache else input_ids.new_empty((input_ids.size(0), 0)),
        )

    def decode_step(self, tokens: Tensor, state: Seq2SeqState) -> Tensor:
        """Feed one token per row, tokens (B, 1) -> next-token logits (B, V); updates ``state``."""
        if tokens.dim() != 2 or tokens.size(1) != 1 or tokens.size(0) != state.batch_size:
            raise ValueError(f"tokens must have shape ({state.batch_size}, 1); got {tuple(tokens.shape)}")
        if state.caches is not None:
            y = self._embed(self.tgt_embed, tokens, offset=state.length)  # (B, 1, D)
            # One query attending to every cached key needs no mask.
            y = self.decoder(y, state.memory, memory_mask=state.memory_mask, cache=state.caches)
        else:
            state.history = torch.cat([state.history, tokens], dim=1)  # (B, t+1)
            t = state.history.size(1)
            y = self.decoder(self._embed(self.tgt_embed, state.history), state.memory,
                             self_mask=causal_mask(t, device=tokens.device), memory_mask=state.memory_mask)
            y = y[:, -1:]  # (B, 1, D)
        state.length += 1
        return self.lm_head(y[:, 0])  # (B, V)


class TransformerClassifier(nn.Module):
    """Transformer encoder (Vaswani et al. 2017, section 3.1) + pooling + linear head over intents."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int, pad_id: int, num_labels: int):
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.max_len = cfg.max_len
        d = cfg.d_model
        self.embed = TokenEmbedding(vocab_size, d, padding_idx=pad_id)
        self.positions = SinusoidalPositionalEmbedding(cfg.max_len, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = TransformerEncoder(cfg.num_encoder_layers, d, cfg.n_heads, cfg.d_ff, cfg.dropout,
                                          cfg.activation, cfg.norm_first)
        self.head = nn.Linear(d, num_labels)
        _init_linear(self)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, S) right-padded; labels (B,) class indices -> logits (B, C)."""
        keep = input_ids != self.pad_id  # (B, S)
        x = self.dropout(self.embed(input_ids) + self.positions(input_ids.size(1)))
        h = self.encoder(x, keep[:, None, None, :])  # (B, S, D)
        if self.cfg.pooling == "first":
            pooled = h[:, 0]  # (B, D): the first token ([CLS] when the tokenizer adds one)
        else:
            w = keep.unsqueeze(-1).to(h.dtype)  # (B, S, 1)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # mean over real tokens only
        logits = self.head(self.dropout(pooled))  # (B, C)
        loss = None
        losses: dict[str, Tensor] = {}
        if labels is not None:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
            losses["classification"] = loss
        return ModelOutput(logits=logits, loss=loss, losses=losses)


@torch.no_grad()
def load_from_torch_transformer(model: TransformerSeq2Seq, ref: nn.Transformer) -> None:
    """Copy the encoder/decoder stacks of a ``torch.nn.Transformer`` into ``model`` (for parity tests).

    ``nn.Transformer`` always ends both stacks with a LayerNorm; ours does only for pre-LN, so for a
    post-LN model set ``ref.encoder.norm = ref.decoder.norm = None`` first. Embeddings and the output
    projection are not part of ``nn.Transformer`` and are left untouched.
    """
    load_stack_from_torch(model.encoder, ref.encoder)
    load_stack_from_torch(model.decoder, ref.decoder)


def build(cfg: TransformerConfig, ctx: BuildContext) -> nn.Module:
    """Builder for the registry: ``generation`` -> :class:`TransformerSeq2Seq`,
    ``classification`` -> :class:`TransformerClassifier`."""
    if ctx.task == "generation":
        return TransformerSeq2Seq(cfg, ctx.vocab_size, ctx.special.pad)
    if ctx.task == "classification":
        if ctx.num_labels is None or ctx.num_labels < 1:
            raise ValueError(f"task 'classification' needs num_labels >= 1; got {ctx.num_labels!r}")
        return TransformerClassifier(cfg, ctx.vocab_size, ctx.special.pad, ctx.num_labels)
    raise ValueError(f"transformer does not support task {ctx.task!r}; supported: generation, classification")
