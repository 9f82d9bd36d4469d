"""ELMo (Peters et al. 2018, "Deep contextualized word representations"): a character-CNN token
encoder with highway layers and a projection, a 2-layer biLSTM language model trained forward and
backward with one softmax shared by both directions, and the task-specific scalar mix of its layers
as features for a classifier.

Registered as family ``elmo`` for the tasks ``lm`` (biLM pre-training) and ``classification``.

Tokens are the tokenizer's pieces (SentencePiece ids, the same ids every chatforge pipeline and
the serving wrappers feed): each id is spelled as the UTF-8 bytes of its piece (language
independent, no character vocabulary to build) through a table registered in the model, so the
model takes plain ``input_ids`` and the bundle carries the spelling with its weights.
Sentence boundaries ``<s>`` / ``</s>`` are added inside the model, so the LM and the classifier see
the same framing whether called from training or from serving.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.models.elmo.config import ElmoConfig
from chatforge.models.outputs import ModelOutput
from chatforge.modules.highway import Highway
from chatforge.modules.scalar_mix import ScalarMix
from chatforge.registry import BuildContext
from chatforge.tasks import IGNORE_INDEX
from chatforge.tokenizer import SpecialIds

logger = logging.getLogger(__name__)


# Character (byte) vocabulary: 0 pad, 1 beginning of word, 2 end of word, byte b -> b + 3.
CHAR_PAD, CHAR_BOW, CHAR_EOW, CHAR_OFFSET = 0, 1, 2, 3
CHAR_VOCAB = 256 + CHAR_OFFSET


def spell_pieces(pieces: list[str], max_chars: int) -> Tensor:
    """Piece strings -> (V, max_chars) byte ids: BOW, UTF-8 bytes (truncated), EOW, padding."""
    table = torch.full((len(pieces), max_chars), CHAR_PAD, dtype=torch.long)
    for i, piece in enumerate(pieces):
        b = list(piece.encode("utf-8"))[: max_chars - 2]
        table[i, : len(b) + 2] = torch.tensor([CHAR_BOW, *(x + CHAR_OFFSET for x in b), CHAR_EOW])
    return table


class CharCNNEncoder(nn.Module):
    """Token representation from characters (Kim et al. 2016; Peters et al. 2018, section 3.4):
    byte embeddings, one convolution per filter width max-pooled over the token, highway layers,
    a linear projection. Token ids are spelled through the ``char_table`` buffer (V, max_chars)."""

    def __init__(self, cfg: ElmoConfig, vocab_size: int):
        super().__init__()
        self.register_buffer("char_table", torch.zeros(vocab_size, cfg.max_chars, dtype=torch.long))
        self.has_vocabulary = False
        self.char_embed = nn.Embedding(CHAR_VOCAB, cfg.char_embed_dim, padding_idx=CHAR_PAD)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.char_embed_dim, n, w) for w, n in cfg.filters)
        n_filters = sum(n for _, n in cfg.filters)
        self.highway = Highway(n_filters, cfg.num_highway)
        self.projection = nn.Linear(n_filters, cfg.projection_dim)
        self.max_chars = cfg.max_chars

    def set_vocabulary(self, tokenizer: Any) -> None:
        """Spell every id of ``tokenizer`` (anything with ``vocab_size`` and ``id_to_piece``)."""
        pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        if len(pieces) != self.char_table.size(0):
            raise ValueError(f"tokenizer has {len(pieces)} pieces; this model was built for "
                             f"vocab_size={self.char_table.size(0)}")
        self.char_table.copy_(spell_pieces(pieces, self.max_chars))
        self.has_vocabulary = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "char_table" in state_dict:  # spelling restored with the weights
            self.has_vocabulary = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> token representations (B, T, projection_dim)."""
        if not self.has_vocabulary:
            raise RuntimeError("this ELMo model has no token spelling yet: call "
                               "model.set_vocabulary(tokenizer) (run_experiment and load_bundle do it)")
        chars = self.char_table[ids]  # (B, T, C)
        b, t, c = chars.shape
        x = self.char_embed(chars.reshape(b * t, c)).transpose(1, 2)  # (B*T, E, C)
        # Max over positions of each filter's response = the strongest n-gram match in the token.
        pooled = [torch.relu(conv(x)).max(dim=2).values for conv in self.convs]  # each (B*T, n)
        h = self.highway(torch.cat(pooled, dim=1))  # (B*T, F)
        return self.projection(h).reshape(b, t, -1)  # (B, T, P)


def _reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first lengths[b] positions of x (B, T, ...), leaving padding in place."""
    t = x.size(1)
    pos = torch.arange(t, device=x.device)[None]  # (1, T)
    idx = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)  # (B, T)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


class _LstmStack(nn.Module):
    """One direction: LSTM layers projected to projection_dim, residual from layer 2 on."""

    def __init__(self, cfg: ElmoConfig):
        super().__init__()
        p = cfg.projection_dim
        proj = p if cfg.lstm_hidden != p else 0  # LSTMP (Sak et al. 2014) as in the paper
        self.layers = nn.ModuleList(nn.LSTM(p, cfg.lstm_hidden, batch_first=True, proj_size=proj)
                                    for _ in range(cfg.num_lstm_layers))
        self.residual = cfg.residual
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, lstm in enumerate(self.layers):
            h, _ = lstm(self.dropout(x))  # (B, T, P)
            if self.residual and i > 0:
                h = h + x
            outs.append(h)
            x = h
        return outs


class ElmoBiLM(nn.Module):
    """The biLM (Peters et al. 2018, section 3.1): char-CNN token layer + forward and backward
    LSTM stacks with separate weights. ``layers`` returns the L+1 representations with the two
    directions concatenated (the token layer duplicated), the inputs of the scalar mix."""

    def __init__(self, cfg: ElmoConfig, vocab_size: int, special: SpecialIds):
        super().__init__()
        self.cfg, self.special = cfg, special
        self.char_encoder = CharCNNEncoder(cfg, vocab_size)
        self.forward_lstm = _LstmStack(cfg)
        self.backward_lstm = _LstmStack(cfg)

    def frame(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Right-padded ids (B, T) -> ``<s> ids </s>`` (B, T+2) and the framed lengths (B,)."""
        pad, b = self.special.pad, input_ids.size(0)
        lengths = (input_ids != pad).sum(1)  # (B,)
        framed = F.pad(input_ids, (1, 1), value=pad)
        framed[:, 0] = self.special.bos
        framed[torch.arange(b, device=framed.device), lengths + 1] = self.special.eos
        return framed, lengths + 2

    def forward(self, framed: Tensor, lengths: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """framed (B, T) -> token layer (B, T, P), forward and backward layer outputs (B, T, P) each."""
        tokens = self.char_encoder(framed)
        fwd = self.forward_lstm(tokens)
        # The backward LM reads each sentence right to left: reverse within its length, run, reverse back.
        bwd = [_reverse_padded(h, lengths) for h in self.backward_lstm(_reverse_padded(tokens, lengths))]
        return tokens, fwd, bwd

    def layers(self, framed: Tensor, lengths: Tensor) -> list[Tensor]:
        tokens, fwd, bwd = self(framed, lengths)
        return [torch.cat([tokens, tokens], -1)] + [torch.cat([f, b], -1) for f, b in zip(fwd, bwd, strict=True)]

    def set_vocabulary(self, tokenizer: Any) -> None:
        self.char_encoder.set_vocabulary(tokenizer)


class ElmoLanguageModel(nn.Module):
    """biLM pre-training: jointly maximise the forward and backward log likelihoods (section 3.1)
    with the softmax layer shared by the two directions."""

    def __init__(self, cfg: ElmoConfig, vocab_size: int, special: SpecialIds):
        super().__init__()
        self.elmo = ElmoBiLM(cfg, vocab_size, special)
        self.softmax = nn.Linear(cfg.projection_dim, vocab_size)  # one output layer, both directions
        self.dropout = nn.Dropout(cfg.dropout)

    def set_vocabulary(self, tokenizer: Any) -> None:
        self.elmo.set_vocabulary(tokenizer)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) right-padded tokens (no <s>/</s>: added here); labels (B, T) the same
        tokens with -100 where ignored -> forward-direction logits (B, T, V), logits[:, t]
        predicting token t from the tokens before it. The loss also covers </s> (forward) and
        <s> (backward) and is the mean of the two directions' per-token losses."""
        framed, lengths = self.elmo.frame(input_ids)
        _, fwd, bwd = self.elmo(framed, lengths)
        fwd_logits = self.softmax(self.dropout(fwd[-1]))  # (B, T+2, V)
        t = input_ids.size(1)
        out = ModelOutput(logits=fwd_logits[:, :t])
        if labels is None:
            return out
        bwd_logits = self.softmax(self.dropout(bwd[-1]))  # (B, T+2, V)
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        n = lengths - 2  # real tokens per row
        # Forward: position i (<s> or token i-1) predicts token i; the last token predicts </s>.
        fwd_tgt = torch.full_like(framed, IGNORE_INDEX)
        fwd_tgt[:, :t] = labels
        fwd_tgt[rows, n] = self.elmo.special.eos
        # Backward: position j (token j-1 or </s>) predicts the token before it; token 0 predicts <s>.
        bwd_tgt = torch.full_like(framed, IGNORE_INDEX)
        bwd_tgt[:, 2:] = labels
        bwd_tgt[:, 1] = self.elmo.special.bos
        v = fwd_logits.size(-1)
        lf = F.cross_entropy(fwd_logits.reshape(-1, v).float(), fwd_tgt.reshape(-1), ignore_index=IGNORE_INDEX)
        lb = F.cross_entropy(bwd_logits.reshape(-1, v).float(), bwd_tgt.reshape(-1), ignore_index=IGNORE_INDEX)
        out.loss = 0.5 * (lf + lb)
        out.losses = {"lm_forward": lf, "lm_backward": lb}
        return out


class ElmoClassifier(nn.Module):
    """Sequence classifier on ELMo features (Peters et al. 2018, section 3.3): the task's scalar
    mix gamma * sum_j softmax(s)_j h_j over the biLM layers, pooled over the sentence, then a
    (optionally one-hidden-layer) classifier. ``freeze_lm`` keeps the biLM fixed (in eval mode,
    no gradients), as the paper does; otherwise it is fine-tuned with the task."""

    def __init__(self, cfg: ElmoConfig, vocab_size: int, special: SpecialIds, num_labels: int):
        super().__init__()
        self.cfg = cfg
        self.elmo = ElmoBiLM(cfg, vocab_size, special)
        self.mix = ScalarMix(cfg.num_lstm_layers + 1, layer_norm=cfg.mix_layer_norm)
        d = 2 * cfg.projection_dim
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.classifier_hidden:
            self.head = nn.Sequential(nn.Linear(d, cfg.classifier_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                      nn.Linear(cfg.classifier_hidden, num_labels))
        else:
            self.head = nn.Linear(d, num_labels)
        if cfg.freeze_lm:
            self.elmo.requires_grad_(False)

    def set_vocabulary(self, tokenizer: Any) -> None:
        self.elmo.set_vocabulary(tokenizer)

    def train(self, mode: bool = True) -> ElmoClassifier:
        super().train(mode)
        if self.cfg.freeze_lm:
            self.elmo.eval()  # frozen features: no dropout inside the biLM either
        return self

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) right-padded; labels (B,) -> logits (B, C)."""
        framed, lengths = self.elmo.frame(input_ids)
        mask = torch.arange(framed.size(1), device=framed.device)[None] < lengths[:, None]  # (B, T+2)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_lm):
            layers = self.elmo.layers(framed, lengths)
        h = self.dropout(self.mix(layers, mask))  # (B, T+2, 2P)
        m = mask.unsqueeze(-1)
        if self.cfg.pooling == "max":
            pooled = h.masked_fill(~m, float("-inf")).max(1).values
        else:
            pooled = (h * m.to(h.dtype)).sum(1) / m.sum(1).clamp(min=1).to(h.dtype)
        logits = self.head(pooled)  # (B, C)
        out = ModelOutput(logits=logits)
        if labels is not None:
            out.loss = F.cross_entropy(logits.float(), labels)
            out.losses = {"classification": out.loss}
        return out


def build(cfg: ElmoConfig, ctx: BuildContext) -> nn.Module:
    """Builder for the registry: ``lm`` -> :class:`ElmoLanguageModel`, ``classification`` ->
    :class:`ElmoClassifier`. The spelling table comes from ``ctx.tokenizer`` when the context
    carries one (the run driver and bundle loading pass it), else from the weights or an explicit
    ``set_vocabulary(tokenizer)``."""
    if ctx.task == "lm":
        model: nn.Module = ElmoLanguageModel(cfg, ctx.vocab_size, ctx.special)
    elif ctx.task == "classification":
        if ctx.num_labels is None or ctx.num_labels < 1:
            raise ValueError(f"task 'classification' needs num_labels >= 1; got {ctx.num_labels!r}")
        model = ElmoClassifier(cfg, ctx.vocab_size, ctx.special, ctx.num_labels)
    else:
        raise ValueError(f"elmo does not support task {ctx.task!r}; supported: lm, classification")
    if ctx.tokenizer is not None:
        model.set_vocabulary(ctx.tokenizer)
    return model

