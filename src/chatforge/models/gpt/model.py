"""GPT (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training") and its
GPT-2 variant (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only Transformer with learned positions, GELU and tied input/output embeddings.
Registered as family ``gpt`` for the tasks:

* ``lm``: causal language modelling on the corpus text (pre-training, section 3.1 of the paper);
  prompts are used as given, so a converted HF checkpoint continues text exactly like HF.
* ``generation``: chat replies as ``<s> question [SEP] answer </s>``, loss on the answer only
  unless ``loss_on_prompt``; decoding feeds ``<s> question [SEP]`` and continues.
* ``classification`` / ``pair_classification``: the paper's task-aware input transformations
  (section 3.3): ``<s> text [CLS]`` (pairs: ``<s> a [SEP] b [CLS]``); the classifier reads the
  hidden state of the final extract token ``[CLS]`` and the loss is ``L3 = L2 + λ·L1`` with
  ``λ = aux_lm_weight`` (section 3.2, paper: 0.5).

``variant: gpt`` is the 2018 model (post-LN blocks, exact GELU, no final LayerNorm; the original
code and HF's ``OpenAIGPT`` compute the tanh approximation, so converted checkpoints say
``activation: gelu_tanh``);
``variant: gpt2`` moves LayerNorm to each sub-block's input, adds a final LayerNorm and uses the
tanh GELU (GPT-2, section 2.3). ``norm_first``/``final_norm``/``activation`` override the
variant's choice. Parameter names map 1:1 onto HF's ``OpenAIGPTModel``/``GPT2Model``
(see :mod:`chatforge.interop.hf_gpt`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.models.gpt.config import GPTConfig
from chatforge.models.outputs import ModelOutput
from chatforge.modules import (
    FeedForward,
    GrowingKVCache,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    TokenEmbedding,
    apply_linear,
    linear_fn,
)
from chatforge.modules.scripted import attach_scripted_step, plain_executor
from chatforge.registry import BuildContext
from chatforge.tasks import IGNORE_INDEX
from chatforge.tokenizer import SpecialIds

logger = logging.getLogger(__name__)


GPT_TASKS = ("lm", "generation", "classification", "pair_classification")


class BlockPlan(NamedTuple):
    """One block's tensors and constants for :func:`_decode_block` (``(weight, bias, eps)`` per LayerNorm,
    a callable per linear (``modules.linear_fn``: ``F.linear`` on float weights, the module itself when
    quantized to int8); ``qkv`` None when the projections are not fused)."""

    norm_first: bool
    shape: tuple[int, ...]  # LayerNorm normalized_shape
    ln1: tuple[Tensor, Tensor, float]
    ln2: tuple[Tensor, Tensor, float]
    qkv: Callable[[Tensor], Tensor] | None
    attn: MultiHeadAttention  # the unfused path calls it
    out: Callable[[Tensor], Tensor]
    n_heads: int
    head_dim: int
    d_model: int
    fc1: Callable[[Tensor], Tensor]
    fc2: Callable[[Tensor], Tensor]
    act: Callable[[Tensor], Tensor]


class DecodePlan(NamedTuple):
    """:meth:`GPTModel.decode`'s inputs besides the tokens: embeddings, one plan per block, the final norm."""

    wte: Tensor
    wpe: Tensor
    blocks: list[BlockPlan]
    ln_f: tuple[tuple[int, ...], Tensor, Tensor, float] | None


class GPTBlock(nn.Module):
    """One decoder block: masked self-attention and a GELU MLP, each with a residual.

    Post-LN (GPT, as in Vaswani et al.): ``x = LN(x + Sublayer(x))``; pre-LN (GPT-2, section 2.3):
    ``x = x + Sublayer(LN(x))``. Dropout sits on each residual branch, as in both reference codes.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float,
                 activation: str, norm_first: bool, eps: float, bias: bool):
        super().__init__()
        self.norm_first = norm_first
        self.attn = MultiHeadAttention(d_model, n_heads, attn_dropout, bias=bias, fused_qkv=True)
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = FeedForward(d_model, d_ff, 0.0, activation, bias=bias)  # type: ignore[arg-type]
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: GrowingKVCache | None = None,
                is_causal: bool = False) -> Tensor:
        if self.norm_first:
            x = x + self.drop(self.attn(self.ln_1(x), mask=mask, cache=cache, is_causal=is_causal))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask=mask, cache=cache, is_causal=is_causal)))
        return self.ln_2(x + self.drop(self.mlp(x)))

    def decode_plan(self) -> BlockPlan:
        """The tensors and constants :func:`_decode_block` reads, gathered once per reply: batch-1
        decoding is bound by per-call overhead, and each ``nn.Module`` attribute lookup of a
        submodule or parameter goes through ``Module.__getattr__`` (about 100 per token)."""
        a, m, ln1, ln2 = self.attn, self.mlp, self.ln_1, self.ln_2
        act = m.activation
        if isinstance(act, nn.GELU):
            act_fn = partial(F.gelu, approximate=act.approximate)
        elif isinstance(act, nn.ReLU):
            act_fn = F.relu
        else:
            act_fn = act
        qkv = linear_fn(a.qkv_proj) if a.fused_qkv else None
        return BlockPlan(
            norm_first=self.norm_first, shape=ln1.normalized_shape,
            ln1=(ln1.weight, ln1.bias, ln1.eps), ln2=(ln2.weight, ln2.bias, ln2.eps),
            qkv=qkv, attn=a, out=linear_fn(a.out_proj),
            n_heads=a.n_heads, head_dim=a.head_dim, d_model=a.d_model,
            fc1=linear_fn(m.linear1), fc2=linear_fn(m.linear2), act=act_fn,
        )


class GPTModel(nn.Module):
    """The GPT backbone (Radford et al. 2018, section 3.1): h0 = U·We + Wp, n blocks, (final LN)."""

    def __init__(self, cfg: GPTConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wte = TokenEmbedding(vocab_size, d, padding_idx=None, scale=False)
        self.wpe = LearnedPositionalEmbedding(cfg.n_positions, d, init_std=cfg.init_std)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            GPTBlock(d, cfg.n_heads, cfg.ff_dim, cfg.dropout, cfg.attn_dropout, cfg.act, cfg.pre_ln,
                     cfg.layer_norm_epsilon, cfg.bias)
            for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon) if cfg.has_final_norm else None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.wte.weight, std=std)
        # GPT-2 (section 2.3): scale the residual projections by 1/sqrt(N) so the residual stream's
        # variance does not grow with depth (N = 2 residual branches per block).
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp.linear2):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    @property
    def n_positions(self) -> int:
        return self.cfg.n_positions

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, mask: Tensor | None = None,
                caches: list[GrowingKVCache] | None = None, is_causal: bool = True) -> Tensor:
        """input_ids (B, T) -> hidden states (B, T, D).

        Without ``mask`` attention is causal over the T tokens (plus anything cached, which then
        needs an explicit ``mask``). ``position_ids`` (B, T) default to 0..T-1 after the cache.
        """
        t = input_ids.size(1)
        if position_ids is None:
            offset = len(caches[0]) if caches else 0
            if offset + t > self.cfg.n_positions:
                raise ValueError(f"{offset + t} positions exceed the model's n_positions={self.cfg.n_positions}")
            pos = self.wpe(t, offset)  # (1, T, D)
        else:
            if int(position_ids.max()) >= self.cfg.n_positions:
                raise ValueError(f"position {int(position_ids.max())} exceeds n_positions={self.cfg.n_positions}")
            pos = self.wpe.embedding(position_ids)  # (B, T, D)
        # GPT's token embedding is unscaled, so skip TokenEmbedding's multiply by 1.0.
        x = self.drop(self.wte.embedding(input_ids) + pos)
        causal = is_causal and mask is None
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=caches[i] if caches is not None else None, is_causal=causal)
        return self.ln_f(x) if self.ln_f is not None else x

    def decode_plan(self) -> DecodePlan:
        """What :meth:`decode` reads, gathered once per reply (see :meth:`GPTBlock.decode_plan`)."""
        ln = self.ln_f
        return DecodePlan(wte=self.wte.embedding.weight, wpe=self.wpe.embedding.weight,
                          blocks=[b.decode_plan() for b in self.blocks],
                          ln_f=(ln.normalized_shape, ln.weight, ln.bias, ln.eps) if ln is not None else None)

    def decode(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None,
               caches: list[GrowingKVCache], plan: DecodePlan | None = None) -> Tensor:
        """``forward`` for decoding steps in eval mode: input_ids/position_ids (B, T) continuing the
        cached keys, mask (B, 1, T, L + T) or None -> hidden states (B, T, D). The caller checks the
        positions (this avoids ``forward``'s device sync on ``position_ids.max()`` every step).
        ``plan``: :meth:`decode_plan`, kept by the caller for the whole reply."""
        wte, wpe, blocks, ln = plan if plan is not None else self.decode_plan()
        x = F.embedding(input_ids, wte) + F.embedding(position_ids, wpe)  # (B, T, D)
        for block, cache in zip(blocks, caches, strict=True):
            x = _decode_block(block, x, mask, cache)
        return F.layer_norm(x, ln[0], ln[1], ln[2], ln[3]) if ln is not None else x


def _decode_block(plan: BlockPlan, x: Tensor, mask: Tensor | None, cache: GrowingKVCache) -> Tensor:
    """``GPTBlock.forward`` in eval mode for new tokens over a KV cache, from the block's plan: the
    same arithmetic (dropout is the identity in eval) with no module calls or attribute lookups."""
    shape, (ln1w, ln1b, eps1), (ln2w, ln2b, eps2) = plan.shape, plan.ln1, plan.ln2
    qkv, out, n_heads, head_dim, d_model = plan.qkv, plan.out, plan.n_heads, plan.head_dim, plan.d_model
    fc1, fc2, act = plan.fc1, plan.fc2, plan.act

    def attend(h: Tensor) -> Tensor:
        b, t, _ = h.shape
        if qkv is None:  # unfused projections: the module's own path
            return plan.attn.cached_self_attention(h, cache, mask)
        q, k, v = qkv(h).view(b, t, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = cache.append(k, v)  # (B, H, L + T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        return out(y.transpose(1, 2).reshape(b, t, d_model))

    if plan.norm_first:
        x = x + attend(F.layer_norm(x, shape, ln1w, ln1b, eps1))
        h = F.layer_norm(x, shape, ln2w, ln2b, eps2)
        return x + fc2(act(fc1(h)))
    x = F.layer_norm(x + attend(x), shape, ln1w, ln1b, eps1)
    return F.layer_norm(x + fc2(act(fc1(x))), shape, ln2w, ln2b, eps2)


def _lm_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def _next_token_targets(input_ids: Tensor, pad_id: int) -> Tensor:
    """Targets (B, T) for predicting input_ids[:, t+1] at t; the last position and pads ignored."""
    nxt = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_id, IGNORE_INDEX)  # (B, T-1)
    return F.pad(nxt, (0, 1), value=IGNORE_INDEX)  # (B, T)


@dataclass
class GPTState:
    """Decoding state of a decoder-only model for :mod:`chatforge.decoding`.

    The prompt (all but its last token) is prefilled by ``init_state``; ``start_tokens`` holds each
    row's last prompt token, which decoding feeds first. Prompts are left-padded so every row's
    next position is the same column: ``key_mask`` (B, 1, 1, L) marks real keys (None when no row
    is padded) and ``next_pos`` (B,) the position id of each row's next token.
    """

    start_tokens: Tensor  # (B, 1)
    next_pos: Tensor  # (B,)
    key_mask: Tensor | None  # (B, 1, 1, L) True = real token
    caches: list[GrowingKVCache] | None
    history: Tensor | None  # (B, L) every token fed so far, when uncached (the reference)
    pos_history: Tensor | None  # (B, L) their position ids, when uncached
    max_steps: int  # positions left before n_positions
    plan: DecodePlan | None = None  # GPTModel.decode_plan(), built at the first cached eval-mode step

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder/repeat batch rows (dropping finished rows, beam search)."""
        index = index.to(self.next_pos.device)
        self.start_tokens = self.start_tokens.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        if self.caches is not None:
            for c in self.caches:
                c.reorder(index)
        if self.history is not None:
            self.history = self.history.index_select(0, index)
            self.pos_history = self.pos_history.index_select(0, index)


def _row_lengths(input_ids: Tensor, pad_id: int) -> Tensor:
    """Length of each right-padded row of (B, S) ids: up to and including its last non-pad token.

    Not the count of non-pad tokens: GPT-2's pad id is <|endoftext|>, which may occur inside a text.
    """
    positions = torch.arange(1, input_ids.size(1) + 1, device=input_ids.device)  # (S,)
    return ((input_ids != pad_id) * positions).amax(1)  # (B,)


def _attn_mask(key_mask: Tensor, q_len: int) -> Tensor:
    """Causal + key padding (B, 1, T, L) for the last ``q_len`` of L positions; a query may always
    see itself, so rows of left padding attend to something and stay finite (no NaN in the cache)."""
    k_len = key_mask.size(-1)
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=key_mask.device).tril(k_len - q_len)
    diag = torch.zeros_like(causal)
    diag[:, k_len - q_len:] = torch.eye(q_len, dtype=torch.bool, device=key_mask.device)
    return (causal[None, None] & key_mask) | diag[None, None]


class _GPTHeadBase(nn.Module):
    def __init__(self, cfg: GPTConfig, vocab_size: int, special: SpecialIds, task: str):
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.special = special
        self.pad_id = special.pad
        # vocab_size: the tokenizer's ids; rows: the embedding's, more when a checkpoint padded its vocabulary.
        rows = cfg.vocab_rows or vocab_size
        if rows < vocab_size:
            raise ValueError(f"model.vocab_rows={rows} is smaller than the tokenizer's {vocab_size} ids: every id "
                             f"needs an embedding row; allowed: vocab_rows >= {vocab_size} (rows past the tokenizer "
                             f"are padding), or leave it out")
        self.vocab_size = vocab_size
        self.transformer = GPTModel(cfg, rows)
        self.lm_head = nn.Linear(cfg.d_model, rows, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # paper section 3.1: W_e reused as output
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def _token_logits(self, logits: Tensor) -> Tensor:
        """(..., rows) -> (..., vocab_size): padded rows stand for no token, so no loss, argmax or sample sees
        them (a view; nothing is computed twice)."""
        return logits if logits.size(-1) == self.vocab_size else logits[..., : self.vocab_size]

    @property
    def delimiter_id(self) -> int:
        # GPT-2's vocabulary has no [SEP]; fall back to its only special token, </s> (<|endoftext|>).
        return self.special.sep if self.special.sep is not None else self.special.eos

    @property
    def extract_id(self) -> int:
        return self.special.cls if self.special.cls is not None else self.special.eos


class GPTLMHeadModel(_GPTHeadBase):
    """GPT with the tied LM head (Radford et al. 2018, section 3.1): ``lm`` and ``generation`` tasks.

    ``forward`` is teacher-forced training on pre-shifted labels; ``init_state``/``decode_step`` is
    the incremental interface :mod:`chatforge.decoding` drives (prompt prefill + KV cache).
    """

    # The scripted decoding step (use_scripted_step), kept out of the module tree: not a submodule, so it is
    # in no state_dict and no .to(); it reads the weights as they were when it was built.
    _scripted_step: torch.jit.ScriptModule | None = None

    def __init__(self, cfg: GPTConfig, vocab_size: int, special: SpecialIds, task: str = "lm"):
        super().__init__(cfg, vocab_size, special, task)
        self.max_len = cfg.n_positions

    def use_scripted_step(self, enable: bool = True) -> str | None:
        """Decode (``decode_step``, and ``GPTStepModel.verify``) with the TorchScript step of
        :mod:`chatforge.models.gpt.scripted` (the same logits; it gives the GIL up for the whole step, not
        once per op), for inference: build it after the last change to the weights (``pack_linear_layers``,
        loading). Returns None when it is used, else why not (the model then decodes eagerly);
        ``enable=False`` drops it."""
        from chatforge.models.gpt.scripted import script_decoder, scriptable

        return attach_scripted_step(self, scriptable, script_decoder, enable)

    def scripted_logits(self, tokens: Tensor, position_ids: Tensor, mask: Tensor | None,
                        caches: list[GrowingKVCache]) -> Tensor | None:
        """Next-token logits (B, T, V) of ``tokens`` (B, T) at ``position_ids`` over the caches, which gain
        T positions, from the scripted step; None (nothing done) when there is none to use: not built, in
        training mode, under autocast, or caches without buffers yet."""
        scripted = self._scripted_step
        if scripted is None or self.training or torch.is_autocast_enabled(tokens.device.type):
            return None
        t = tokens.size(1)
        bufs = [c.reserve(t) for c in caches]
        if any(b is None for b in bufs):
            return None
        start = len(caches[0])
        with plain_executor():
            logits = scripted(tokens, position_ids, mask, [b[0] for b in bufs], [b[1] for b in bufs], start)
        for c in caches:
            c.advance(t)
        return logits

    def _scripted_prefill(self, prompt: Tensor, position_ids: Tensor | None, mask: Tensor | None,
                          caches: list[GrowingKVCache], logits: bool = True) -> Tensor | bool | None:
        """``prefill_rows(feed_last=True)``'s forward pass on the scripted step -> logits (B, V), or None as
        :meth:`scripted_logits` (the caches are new and empty: their buffers are made here). ``logits=False``: the
        two-pass prefill's first pass (the prompt into the caches, nothing else) -> True, or None."""
        scripted = self._scripted_step
        if scripted is None or self.training or torch.is_autocast_enabled(prompt.device.type):
            return None
        b, w = prompt.shape
        attn = self.transformer.blocks[0].attn
        like = self.transformer.wte.embedding.weight.new_empty((b, attn.n_heads, 0, attn.head_dim))
        bufs = [c.reserve(w, like) for c in caches]
        keys, values = [k for k, _ in bufs], [v for _, v in bufs]
        with plain_executor():
            out = scripted.prefill(prompt, position_ids, mask, keys, values) if logits else \
                scripted.fill(prompt, position_ids, mask, keys, values)
        for c in caches:
            c.advance(w)
        return out if logits else True

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) right-padded; labels (B, T) aligned with the logits (the token each
        position must predict, -100 = ignored) -> logits (B, T, V)."""
        h = self.transformer(input_ids)  # (B, T, D); causal masking alone suffices for right padding
        logits = self._token_logits(self.lm_head(h))  # (B, T, V)
        loss = None
        losses: dict[str, Tensor] = {}
        if labels is not None:
            targets = labels
            if self.cfg.loss_on_prompt:
                # The question's tokens are in input_ids; the answer's (and </s>) come from labels.
                prompt = _next_token_targets(input_ids, self.pad_id)
                targets = torch.where(labels != IGNORE_INDEX, labels, prompt)
            loss = _lm_loss(logits, targets, self.cfg.label_smoothing)
            losses["lm"] = loss
        return ModelOutput(logits=logits, loss=loss, losses=losses)

    # ---- incremental decoding interface (see chatforge.decoding) ----

    def prompt_ids(self, ids: list[int]) -> list[int]:
        """The model's input for a request: ``<s> q [SEP]`` for generation, the ids as given for lm."""
        if self.task == "generation":
            return [self.special.bos, *ids, self.delimiter_id]
        return list(ids)

    def init_state(self, input_ids: Tensor, use_cache: bool = True) -> GPTState:
        """Prefill the prompts; input_ids (B, S) right-padded with pad_id (each row non-empty)."""
        if input_ids.dim() != 2 or input_ids.size(1) == 0:
            raise ValueError(f"input_ids must be a non-empty (B, S) tensor; got shape {tuple(input_ids.shape)}")
        # One row is never padded: all of it is the prompt, even tokens equal to pad_id (GPT-2's pad is
        # its <|endoftext|>, which a prompt may contain). Several rows end at their last non-pad token.
        lengths = [input_ids.size(1)] if input_ids.size(0) == 1 else _row_lengths(input_ids, self.pad_id).tolist()
        if min(lengths) == 0:
            raise ValueError("every prompt row needs at least one non-pad token")
        rows = [self.prompt_ids(r[:n]) for r, n in zip(input_ids.tolist(), lengths, strict=True)]
        return self.prefill_rows(rows, input_ids.device, use_cache)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest request (ids before :meth:`prompt_ids` adds its special tokens) that leaves room for
        at least one new token within ``n_positions``."""
        return self.cfg.n_positions - 1 - len(self.prompt_ids([]))

    def prefill_rows(self, rows: list[list[int]], device: torch.device | str = "cpu",
                     use_cache: bool = True, feed_last: bool = False) -> GPTState | tuple[GPTState, Tensor]:
        """:meth:`init_state` for prompts already in the model's input form (:meth:`prompt_ids`), one list
        of ids per row, no padding (continuous batching prefills its newcomers with this).

        ``feed_last``: the last prompt token too, in the same forward pass -> (state, its next-token logits
        (B, V)), the state as after :meth:`decode_step` of ``start_tokens``: one pass over the weights instead
        of two (decoding one row reads every weight per pass, so a prompt's first token comes sooner)."""
        width = max(len(r) for r in rows)
        if min(len(r) for r in rows) == 0:
            raise ValueError("every prompt row needs at least one token")
        if width >= self.cfg.n_positions:
            raise ValueError(f"the prompt has {width} tokens; the model's n_positions is {self.cfg.n_positions}")
        dev = device
        # Left-pad, so the next token of every row goes into the same column.
        prompt = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=dev)
        real = torch.zeros((len(rows), width), dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            prompt[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device=dev)
            real[i, width - len(r):] = True
        padded = not bool(real.all())
        pos = (real.cumsum(1) - 1).clamp(min=0)  # (B, W): each row counts from its first real token
        if feed_last and use_cache and not self.training:
            state = GPTState(
                start_tokens=prompt[:, -1:], next_pos=pos[:, -1] + 1, key_mask=real[:, None, None, :] if padded else None,
                caches=[GrowingKVCache(initial_capacity=width + 64) for _ in self.transformer.blocks],
                history=None, pos_history=None, max_steps=self.cfg.n_positions - width + 1,
            )
            mask = _attn_mask(state.key_mask, width) if padded else None
            logits = self._scripted_prefill(prompt, pos if padded else None, mask, state.caches)
            if logits is not None:
                return state, logits
            h = self.transformer(prompt, position_ids=pos if padded else None, mask=mask, caches=state.caches,
                                 is_causal=True)  # (B, W, D)
            return state, self._token_logits(apply_linear(self.lm_head, h[:, -1]))
        state = GPTState(
            start_tokens=prompt[:, -1:], next_pos=pos[:, -1], key_mask=real[:, None, None, :-1] if padded else None,
            caches=[GrowingKVCache(initial_capacity=width + 64) for _ in self.transformer.blocks] if use_cache else None,
            history=prompt[:, :-1] if not use_cache else None,
            pos_history=pos[:, :-1] if not use_cache else None, max_steps=self.cfg.n_positions - width + 1,
        )
        if use_cache and width > 1:
            mask = _attn_mask(state.key_mask, width - 1) if padded else None
            if self.training or self._scripted_prefill(prompt[:, :-1], pos[:, :-1] if padded else None, mask,
                                                       state.caches, logits=False) is None:
                self.transformer(prompt[:, :-1], position_ids=pos[:, :-1] if padded else None, mask=mask,
                                 caches=state.caches, is_causal=True)
        return state

    def decode_step(self, tokens: Tensor, state: GPTState) -> Tensor:
        """Feed one token per row, tokens (B, 1) -> next-token logits (B, V); updates ``state``."""
        b = state.next_pos.size(0)
        if tokens.dim() != 2 or tokens.size(1) != 1 or tokens.size(0) != b:
            raise ValueError(f"tokens must have shape ({b}, 1); got {tuple(tokens.shape)}")
        pos = state.next_pos[:, None]  # (B, 1)
        if state.key_mask is not None:
            state.key_mask = F.pad(state.key_mask, (0, 1), value=True)  # (B, 1, 1, L + 1)
        if state.caches is not None:
            # Positions never exceed the cached length (left-padded rows count from their first real
            # token), so a Python-side check of the cache length bounds them without a device sync.
            cached = len(state.caches[0])
            # Masked columns (draft tokens a speculative step rejected) take cache room but no position,
            # so past n_positions columns the positions themselves decide (one sync, only then).
            if cached >= self.cfg.n_positions and (state.key_mask is None
                                                   or int(state.next_pos.max()) >= self.cfg.n_positions):
                raise ValueError(f"{cached + 1} positions exceed the model's n_positions={self.cfg.n_positions}")
            # One query attending to every cached key needs only the padding mask.
            if self.training:  # dropout active (decoding warns): the module path applies it
                h = self.transformer(tokens, position_ids=pos, mask=state.key_mask, caches=state.caches,
                                     is_causal=False)  # (B, 1, D)
            else:
                logits = self.scripted_logits(tokens, pos, state.key_mask, state.caches)
                if logits is not None:
                    state.next_pos = state.next_pos + 1
                    return logits[:, 0]  # (B, V)
                if state.plan is None:
                    state.plan = self.transformer.decode_plan()
                h = self.transformer.decode(tokens, pos, state.key_mask, state.caches, state.plan)  # (B, 1, D)
        else:
            state.history = torch.cat([state.history, tokens], dim=1)  # (B, L + 1)
            ph = state.pos_history = torch.cat([state.pos_history, pos], dim=1)  # (B, L + 1)
            t = state.history.size(1)
            km = state.key_mask if state.key_mask is not None else torch.ones(
                (b, 1, 1, t), dtype=torch.bool, device=tokens.device)
            h = self.transformer(state.history, position_ids=ph, mask=_attn_mask(km, t))[:, -1:]
        state.next_pos = state.next_pos + 1
        return self._token_logits(apply_linear(self.lm_head, h[:, 0]))  # (B, V)


class GPTClassifier(_GPTHeadBase):
    """GPT fine-tuned for classification (Radford et al. 2018, section 3.2-3.3).

    ``forward`` takes the raw (right-padded) text ids and applies the task-aware input
    transformation itself, ``<s> ids [CLS]``, so serving calls it like any classifier:
    input_ids (B, S) -> logits (B, C) from the final extract token. With labels the loss is
    ``L3 = L2 + aux_lm_weight · L1``, the parts logged as ``classification`` and ``lm``.
    """

    def __init__(self, cfg: GPTConfig, vocab_size: int, special: SpecialIds, num_labels: int,
                 task: str = "classification"):
        super().__init__(cfg, vocab_size, special, task)
        self.max_len = cfg.n_positions - 2
        self.cls_drop = nn.Dropout(cfg.classifier_dropout)
        self.head = nn.Linear(cfg.d_model, num_labels)
        nn.init.normal_(self.head.weight, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def transform(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S) right-padded ids -> (``<s> ids [CLS]`` right-padded (B, S + 2), index of [CLS] (B,))."""
        b, s = input_ids.shape
        lengths = _row_lengths(input_ids, self.pad_id)  # (B,)
        if s + 2 > self.cfg.n_positions:
            raise ValueError(f"input has {s} tokens; the classifier takes at most {self.cfg.n_positions - 2}")
        out = torch.full((b, s + 2), self.pad_id, dtype=torch.long, device=input_ids.device)
        out[:, 0] = self.special.bos
        out[:, 1 : s + 1] = input_ids
        rows = torch.arange(b, device=input_ids.device)
        out[rows, lengths + 1] = self.extract_id
        return out, lengths + 1

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        x, last = self.transform(input_ids)
        h = self.transformer(x)  # (B, S + 2, D)
        pooled = h[torch.arange(h.size(0), device=h.device), last]  # (B, D): the [CLS] extract token
        logits = self.head(self.cls_drop(pooled))  # (B, C)
        loss = None
        losses: dict[str, Tensor] = {}
        if labels is not None:
            task_loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
            losses["classification"] = task_loss
            loss = task_loss
            if self.cfg.aux_lm_weight > 0:
                # L1 on the same inputs: predict every next token, the extract token included.
                lm = _lm_loss(self._token_logits(self.lm_head(h)), _next_token_targets(x, self.pad_id))
                losses["lm"] = lm
                loss = task_loss + self.cfg.aux_lm_weight * lm
        return ModelOutput(logits=logits, loss=loss, losses=losses)


def build(cfg: GPTConfig, ctx: BuildContext) -> nn.Module:
    """Builder for the registry: ``lm``/``generation`` -> :class:`GPTLMHeadModel`,
    ``classification``/``pair_classification`` -> :class:`GPTClassifier`."""
    if ctx.task in ("lm", "generation"):
        return GPTLMHeadModel(cfg, ctx.vocab_size, ctx.special, ctx.task)
    if ctx.task in ("classification", "pair_classification"):
        if ctx.num_labels is None or ctx.num_labels < 1:
            raise ValueError(f"task {ctx.task!r} needs num_labels >= 1; got {ctx.num_labels!r}")
        return GPTClassifier(cfg, ctx.vocab_size, ctx.special, ctx.num_labels, ctx.task)
    raise ValueError(f"gpt does not support task {ctx.task!r}; supported: {', '.join(GPT_TASKS)}")

