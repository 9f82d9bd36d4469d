"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding"): a post-LN Transformer encoder with GELU over token + learned position + segment
embeddings, a pooler on [CLS], masked-LM + next-sentence pre-training heads and fine-tuning heads.

Registered as family ``bert`` for the tasks ``mlm_nsp``, ``mlm`` (masked LM alone), ``classification``,
``pair_classification`` and ``token_classification``. Parameter names map one to one onto
Hugging Face's ``BertModel`` (see :mod:`chatforge.interop.hf_bert`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.models.bert.config import BertConfig
from chatforge.models.bert.pipeline import encode_pair, pad_batch
from chatforge.models.outputs import ModelOutput
from chatforge.modules import LearnedPositionalEmbedding, TokenEmbedding, TransformerEncoderLayer
from chatforge.registry import BuildContext
from chatforge.tasks import IGNORE_INDEX
from chatforge.tokenizer import SpecialIds

logger = logging.getLogger(__name__)


TASKS = ("mlm_nsp", "mlm", "classification", "pair_classification", "token_classification")


class BertEmbeddings(nn.Module):
    """Token + learned position + segment embeddings, LayerNorm, dropout (paper section 3, figure 2)."""

    def __init__(self, cfg: BertConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.word = TokenEmbedding(vocab_size, cfg.d_model, padding_idx=pad_id, scale=False)
        self.position = LearnedPositionalEmbedding(cfg.max_len, cfg.d_model, init_std=cfg.initializer_range)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        x = self.word(input_ids) + self.position(input_ids.size(1))  # (B, T, D)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # all segment A, without materialising (B, T) zeros
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class BertModel(nn.Module):
    """The BERT backbone (Devlin et al. 2019, section 3): embeddings, post-LN GELU encoder, pooler.

    ``forward`` returns ``(hidden (B, T, D), pooled (B, D) or None)``; the pooler is
    ``tanh(W h_[CLS] + b)`` (HF's ``BertPooler``), absent when ``add_pooler`` is False.
    """

    def __init__(self, cfg: BertConfig, vocab_size: int, special: SpecialIds, add_pooler: bool = True):
        super().__init__()
        self.cfg = cfg
        self.special = special
        self.max_len = cfg.max_len
        self.embeddings = BertEmbeddings(cfg, vocab_size, special.pad)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, "gelu",
                                    norm_first=False, layer_norm_eps=cfg.layer_norm_eps)
            for _ in range(cfg.num_layers)
        )
        for layer in self.layers:
            # BERT has no dropout inside the FFN (only on its output); also saves a (B, T, d_ff) pass.
            layer.ff.dropout = nn.Identity()
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if add_pooler else None

    def attention_mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """Bool (B, 1, 1, T) key mask, or None when nothing is padded (lets SDPA take its fastest path)."""
        keep = input_ids != self.special.pad if attention_mask is None else attention_mask.bool()
        if bool(keep.all()):
            return None
        return keep[:, None, None, :]

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, cls_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """-> (hidden (B, T, D), pooled (B, D) or None).

        ``cls_only=True`` is for callers that read only [CLS] (the pooler: sequence classification,
        NSP): the last layer then computes only position 0 — its query over every key, the FFN on
        one row — and ``hidden`` is (B, 1, D). Same numbers for [CLS], about a layer's work less.
        """
        if input_ids.size(1) > self.max_len:
            raise ValueError(f"input has {input_ids.size(1)} tokens; the model's max_len is {self.max_len}")
        mask = self.attention_mask(input_ids, attention_mask)  # built once, shared by every layer
        h = self.embeddings(input_ids, token_type_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = _cls_only_layer(layer, h, mask) if cls_only and i == last else layer(h, mask)
        pooled = torch.tanh(self.pooler(h[:, 0])) if self.pooler is not None else None
        return h, pooled

    def prepare_inputs(self, seqs: list[list[int]], pairs: list[list[int]] | None = None) -> dict[str, Tensor]:
        """Token id lists (without specials) -> the forward kwargs ``[CLS] a [SEP] (b [SEP])``."""
        enc = [encode_pair(a, pairs[i] if pairs is not None else None, self.special, self.max_len)
               for i, a in enumerate(seqs)]
        return pad_batch([e[0] for e in enc], [e[1] for e in enc], self.special.pad)


def _cls_only_layer(layer: TransformerEncoderLayer, h: Tensor, mask: Tensor | None) -> Tensor:
    """A post-LN encoder layer's output at position 0 only: h (B, T, D) -> (B, 1, D).

    Every position after the last layer's attention is computed independently, so [CLS]'s output
    needs only its own query (attending over all keys/values of h) and the FFN of its own row.
    """
    if layer.norm_first:
        raise ValueError("the [CLS]-only path implements BERT's post-LN layer; got a pre-LN layer")
    x = h[:, :1]  # (B, 1, D) the [CLS] row
    x = layer.norm1(x + layer.dropout1(layer.self_attn(x, h, mask=mask)))  # query [CLS], keys/values all
    return layer.norm2(x + layer.dropout2(layer.ff(x)))


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, 0.02) for every matrix and embedding, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _BertTask(nn.Module):
    """Shared plumbing of the task models: the backbone and input preparation."""

    bert: BertModel

    @property
    def max_len(self) -> int:
        return self.bert.max_len

    def prepare_inputs(self, seqs: list[list[int]], pairs: list[list[int]] | None = None) -> dict[str, Tensor]:
        """Used by :class:`chatforge.inference.Classifier` to build BERT's inputs from token ids."""
        return self.bert.prepare_inputs(seqs, pairs)


class BertForPreTraining(_BertTask):
    """Masked LM + next sentence prediction heads (Devlin et al. 2019, section 3.1, tasks #1 and #2).

    The MLM head is dense + GELU + LayerNorm, then the output projection tied to the word
    embeddings plus a per-token bias. With ``labels`` it is evaluated only at the masked positions
    (about 15% of tokens), which is most of the speed-up over computing (B, T, V) logits; then
    ``logits`` is (N_masked, V) in label order. Without labels ``logits`` is (B, T, V).
    ``loss = mlm + nsp``, each also reported in ``losses``.
    """

    def __init__(self, cfg: BertConfig, vocab_size: int, special: SpecialIds):
        super().__init__()
        self.bert = BertModel(cfg, vocab_size, special)
        d = cfg.d_model
        self.mlm_transform = nn.Linear(d, d)
        self.mlm_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.nsp_head = nn.Linear(d, 2)
        init_bert_weights(self, cfg.initializer_range)

    def mlm_logits(self, h: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., V) token logits through the tied output projection."""
        h = self.mlm_norm(F.gelu(self.mlm_transform(h)))
        return F.linear(h, self.bert.embeddings.word.weight, self.mlm_bias)

    def nsp_logits(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                   attention_mask: Tensor | None = None) -> Tensor:
        """(B, 2) next-sentence logits: index 0 = "B follows A", 1 = random."""
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask, cls_only=True)
        return self.nsp_head(pooled)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None,
                next_sentence_label: Tensor | None = None) -> ModelOutput:
        """input_ids/token_type_ids (B, T); labels (B, T) original ids at masked positions, -100
        elsewhere; next_sentence_label (B,) 0 = is next, 1 = random."""
        h, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        losses: dict[str, Tensor] = {}
        if labels is None:
            logits = self.mlm_logits(h)  # (B, T, V)
        else:
            selected = labels != IGNORE_INDEX  # (B, T)
            logits = self.mlm_logits(h[selected])  # (N, V): only where there is something to predict
            targets = labels[selected]
            # An all-unmasked batch would make the mean over zero targets NaN; count it as zero loss.
            losses["mlm"] = (F.cross_entropy(logits.float(), targets) if targets.numel()
                             else logits.sum() * 0.0)
        if next_sentence_label is not None:
            losses["nsp"] = F.cross_entropy(self.nsp_head(pooled).float(), next_sentence_label)
        loss = sum(losses.values()) if losses else None
        return ModelOutput(logits=logits, loss=loss, losses=losses)


class BertForSequenceClassification(_BertTask):
    """Sentence (or sentence-pair) classification from the pooled [CLS] (paper section 4.1, figure 4a/b)."""

    def __init__(self, cfg: BertConfig, vocab_size: int, special: SpecialIds, num_labels: int):
        super().__init__()
        self.bert = BertModel(cfg, vocab_size, special)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, num_labels)
        init_bert_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None) -> ModelOutput:
        """input_ids/token_type_ids (B, T) as ``[CLS] a [SEP] (b [SEP])``; labels (B,) -> logits (B, C)."""
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask, cls_only=True)  # the pooler reads [CLS]
        logits = self.classifier(self.dropout(pooled))  # (B, C)
        loss, losses = None, {}
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
            losses["classification"] = loss
        return ModelOutput(logits=logits, loss=loss, losses=losses)


class BertForTokenClassification(_BertTask):
    """A tag per token from the last hidden states (paper section 5.3, NER; figure 4d)."""

    def __init__(self, cfg: BertConfig, vocab_size: int, special: SpecialIds, num_labels: int):
        super().__init__()
        self.bert = BertModel(cfg, vocab_size, special, add_pooler=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, num_labels)
        init_bert_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None) -> ModelOutput:
        """labels (B, T) tag indices, -100 on [CLS]/[SEP]/padding/non-first sub-tokens -> logits (B, T, C)."""
        h, _ = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(h))  # (B, T, C)
        loss, losses = None, {}
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            losses["token_classification"] = loss
        return ModelOutput(logits=logits, loss=loss, losses=losses)


def build(cfg: BertConfig, ctx: BuildContext) -> nn.Module:
    """Builder for the registry: ``mlm_nsp`` and ``mlm`` -> :class:`BertForPreTraining` (``mlm``: its NSP head
    is never trained); ``classification`` and
    ``pair_classification`` -> :class:`BertForSequenceClassification`; ``token_classification`` ->
    :class:`BertForTokenClassification`."""
    vocab_size = cfg.vocab_size or ctx.vocab_size
    if vocab_size < ctx.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {ctx.vocab_size}")
    if ctx.special.cls is None or ctx.special.sep is None:
        raise ValueError("family 'bert' needs a tokenizer with [CLS] and [SEP] pieces")
    if ctx.task in ("mlm_nsp", "mlm"):
        if ctx.special.mask is None:
            raise ValueError(f"task {ctx.task!r} needs a tokenizer with a [MASK] piece")
        return BertForPreTraining(cfg, vocab_size, ctx.special)
    if ctx.num_labels is None or ctx.num_labels < 1:
        raise ValueError(f"task {ctx.task!r} needs num_labels >= 1; got {ctx.num_labels!r}")
    if ctx.task in ("classification", "pair_classification"):
        return BertForSequenceClassification(cfg, vocab_size, ctx.special, ctx.num_labels)
    if ctx.task == "token_classification":
        return BertForTokenClassification(cfg, vocab_size, ctx.special, ctx.num_labels)
    raise ValueError(f"bert does not support task {ctx.task!r}; supported: {', '.join(TASKS)}")
