"""The Transformer generator's prefill and decoding step for continuous batching as TorchScript graphs, run with the
GIL released: what ``Seq2SeqStepModel.step`` and ``verify`` compute after their masks (target embedding and
positions, every decoder layer over its self- and cross-attention caches, the final norm, the LM head), and what its
``prefill`` computes after padding the prompts (the encoder, then the first decoder step, which projects the encoder's
output into each layer's cross-attention keys and values).

The same ops in the same order as the eager modules (``TransformerDecoderLayer``, ``MultiHeadAttention`` with
separate q/k/v projections, ``FeedForward``), and each linear layer's kernel chosen as its
:class:`~chatforge.modules.linear.PackedLinear` would (:class:`~chatforge.modules.scripted.ScriptedLinear`), so the
logits are bit for bit the eager ones (tests/models/test_transformer_scripted.py). The self-attention keys and values
are appended as ``KVCache.append`` does (``torch.cat``) and returned, the caller storing them. fp32 and int8 models
(:func:`scriptable`); why a scripted step: ``chatforge.modules.scripted``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.modules.scripted import script, scriptable_linear, scripted_linear

__all__ = ["script_decoder", "scriptable"]


class _Attention(nn.Module):
    """``MultiHeadAttention`` (q, k and v projected apart) in eval mode."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v = scripted_linear(attn.q_proj), scripted_linear(attn.k_proj), scripted_linear(attn.v_proj)
        self.out = scripted_linear(attn.out_proj)
        self.n_heads, self.head_dim, self.d_model = int(attn.n_heads), int(attn.head_dim), int(attn.d_model)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def _out(self, y: Tensor, b: int, t: int) -> Tensor:
        return self.out(y.transpose(1, 2).reshape(b, t, self.d_model))

    def self_attend(self, x: Tensor, mask: Tensor | None, k_cache: Tensor,
                    v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t = x.size(0), x.size(1)
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        k = torch.cat([k_cache, k], dim=2)  # (B, H, L + T, Dh)
        v = torch.cat([v_cache, v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self._out(y, b, t), k, v

    def attend(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Self-attention without a cache (the encoder's)."""
        b, t = x.size(0), x.size(1)
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self._out(y, b, t)

    def project(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's output (B, S, D) as cross-attention keys and values (B, H, S, Dh)."""
        return self._heads(self.k(memory)), self._heads(self.v(memory))

    def cross_attend(self, x: Tensor, mask: Tensor | None, k: Tensor, v: Tensor) -> Tensor:
        b, t = x.size(0), x.size(1)
        q = self._heads(self.q(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self._out(y, b, t)


class _FeedForward(nn.Module):
    """``FeedForward`` in eval mode."""

    def __init__(self, ff: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = scripted_linear(ff.linear1), scripted_linear(ff.linear2)
        self.relu = isinstance(ff.activation, nn.ReLU)
        self.approximate = "none" if self.relu else str(ff.activation.approximate)

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc1(x)
        z = F.relu(z) if self.relu else F.gelu(z, approximate=self.approximate)
        return self.fc2(z)


class _EncoderLayer(nn.Module):
    """``TransformerEncoderLayer.forward`` in eval mode."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.norm_first = bool(layer.norm_first)
        self.attn = _Attention(layer.self_attn)
        self.ff = _FeedForward(layer.ff)
        self.w1, self.w2 = layer.norm1.weight.detach(), layer.norm2.weight.detach()
        self.b1, self.b2 = layer.norm1.bias.detach(), layer.norm2.bias.detach()
        self.e1, self.e2 = float(layer.norm1.eps), float(layer.norm2.eps)
        self.d_model = int(layer.norm1.normalized_shape[0])

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        shape = [self.d_model]
        if self.norm_first:
            x = x + self.attn.attend(F.layer_norm(x, shape, self.w1, self.b1, self.e1), mask)
            return x + self.ff(F.layer_norm(x, shape, self.w2, self.b2, self.e2))
        x = F.layer_norm(x + self.attn.attend(x, mask), shape, self.w1, self.b1, self.e1)
        return F.layer_norm(x + self.ff(x), shape, self.w2, self.b2, self.e2)


class _Layer(nn.Module):
    """``TransformerDecoderLayer.forward`` in eval mode (dropout is the identity)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.norm_first = bool(layer.norm_first)
        self.self_attn, self.cross_attn = _Attention(layer.self_attn), _Attention(layer.cross_attn)
        self.ff = _FeedForward(layer.ff)
        norms = (layer.norm1, layer.norm2, layer.norm3)
        self.w1, self.w2, self.w3 = (n.weight.detach() for n in norms)
        self.b1, self.b2, self.b3 = (n.bias.detach() for n in norms)
        self.e1, self.e2, self.e3 = (float(n.eps) for n in norms)
        self.d_model = int(layer.norm1.normalized_shape[0])

    def forward(self, y: Tensor, memory_mask: Tensor | None, self_mask: Tensor | None, k_self: Tensor,
                v_self: Tensor, k_cross: Tensor, v_cross: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = [self.d_model]
        if self.norm_first:
            a, k, v = self.self_attn.self_attend(F.layer_norm(y, shape, self.w1, self.b1, self.e1), self_mask,
                                                 k_self, v_self)
            y = y + a
            y = y + self.cross_attn.cross_attend(F.layer_norm(y, shape, self.w2, self.b2, self.e2), memory_mask,
                                                 k_cross, v_cross)
            return y + self.ff(F.layer_norm(y, shape, self.w3, self.b3, self.e3)), k, v
        a, k, v = self.self_attn.self_attend(y, self_mask, k_self, v_self)
        y = F.layer_norm(y + a, shape, self.w1, self.b1, self.e1)
        y = F.layer_norm(y + self.cross_attn.cross_attend(y, memory_mask, k_cross, v_cross), shape, self.w2, self.b2,
                         self.e2)
        return F.layer_norm(y + self.ff(y), shape, self.w3, self.b3, self.e3), k, v


class _Decoder(nn.Module):
    """Tokens at their positions over every layer's caches -> (logits (B, T, V), each layer's new self keys and
    values); :meth:`prefill`: prompts -> the first step's logits, the encoder's output and every cache."""

    norm_w: Tensor | None
    norm_b: Tensor | None
    enc_norm_w: Tensor | None
    enc_norm_b: Tensor | None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.src_embed = model.src_embed.embedding.weight.detach()
        self.src_scale = float(model.src_embed.scale)
        self.encoder_layers = nn.ModuleList(_EncoderLayer(layer) for layer in model.encoder.layers)
        enc_norm = model.encoder.norm
        self.enc_norm_w = None if enc_norm is None else enc_norm.weight.detach()
        self.enc_norm_b = None if enc_norm is None else enc_norm.bias.detach()
        self.enc_norm_eps = 1e-5 if enc_norm is None else float(enc_norm.eps)
        self.n_heads = int(model.decoder.layers[0].self_attn.n_heads)
        self.head_dim = int(model.decoder.layers[0].self_attn.head_dim)
        self.embed = model.tgt_embed.embedding.weight.detach()
        self.scale = float(model.tgt_embed.scale)
        self.table = model.positions.table
        self.layers = nn.ModuleList(_Layer(layer) for layer in model.decoder.layers)
        norm = model.decoder.norm
        self.norm_w = None if norm is None else norm.weight.detach()
        self.norm_b = None if norm is None else norm.bias.detach()
        self.norm_eps = 1e-5 if norm is None else float(norm.eps)
        self.d_model = int(model.cfg.d_model)
        self.lm_head = scripted_linear(model.lm_head)

    def forward(self, tokens: Tensor, positions: Tensor, self_mask: Tensor | None, memory_mask: Tensor | None,
                k_self: list[Tensor], v_self: list[Tensor], k_cross: list[Tensor],
                v_cross: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        y = F.embedding(tokens, self.embed) * self.scale + self.table[positions]  # (B, T, D)
        new_k: list[Tensor] = []
        new_v: list[Tensor] = []
        i = 0
        for layer in self.layers:
            y, k, v = layer(y, memory_mask, self_mask, k_self[i], v_self[i], k_cross[i], v_cross[i])
            new_k.append(k)
            new_v.append(v)
            i += 1
        w, b = self.norm_w, self.norm_b
        if w is not None and b is not None:
            y = F.layer_norm(y, [self.d_model], w, b, self.norm_eps)
        if y.size(1) == 1:  # one token per row: the eager step's (B, D) call, then (B, 1, V)
            return self.lm_head(y[:, 0]).unsqueeze(1), new_k, new_v
        return self.lm_head(y), new_k, new_v

    @torch.jit.export
    def step_aligned(self, tokens: Tensor, lens: Tensor, memory_mask: Tensor, k_self: list[Tensor],
                     v_self: list[Tensor], k_cross: list[Tensor],
                     v_cross: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """One token per row (``tokens`` (B,)) at positions ``lens`` (B,) over right-aligned caches (row i's keys are
        its last ``lens[i]`` columns): ``Seq2SeqStepModel.step``'s mask and call in the graph -> (logits (B, V), the
        new self keys and values, ``lens + 1``)."""
        width = k_self[0].size(2)
        # After this step appends one key, key j of width + 1 belongs to row i iff j >= width - lens[i].
        keys = torch.arange(width + 1, device=lens.device)
        self_mask = (keys[None, :] >= (width - lens)[:, None])[:, None, None, :]  # (B, 1, 1, width + 1)
        logits, new_k, new_v = self.forward(tokens[:, None], lens[:, None], self_mask, memory_mask, k_self, v_self,
                                            k_cross, v_cross)
        return logits[:, 0], new_k, new_v, lens + 1

    @torch.jit.export
    def prefill(self, src: Tensor, memory_mask: Tensor,
                bos: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``src`` (B, S) right-padded prompts, ``memory_mask`` (B, 1, 1, S) their padding mask, ``bos`` (B, 1) ->
        (the first step's logits (B, V), the encoder's output (B, S, D), each layer's self keys and values after
        position 0, each layer's cross keys and values): ``TransformerSeq2Seq.init_state`` then ``decode_step``."""
        x = F.embedding(src, self.src_embed) * self.src_scale + self.table[: src.size(1)]  # (B, S, D)
        for layer in self.encoder_layers:
            x = layer(x, memory_mask)
        w, b = self.enc_norm_w, self.enc_norm_b
        if w is not None and b is not None:
            x = F.layer_norm(x, [self.d_model], w, b, self.enc_norm_eps)
        y = F.embedding(bos, self.embed) * self.scale + self.table[:1]  # (B, 1, D)
        empty = x.new_zeros((x.size(0), self.n_heads, 0, self.head_dim))
        new_k: list[Tensor] = []
        new_v: list[Tensor] = []
        cross_k: list[Tensor] = []
        cross_v: list[Tensor] = []
        for layer in self.layers:
            kc, vc = layer.cross_attn.project(x)
            # The first query attends to its own key only: the eager step passes no self-attention mask.
            y, k, v = layer(y, memory_mask, None, empty, empty, kc, vc)
            new_k.append(k)
            new_v.append(v)
            cross_k.append(kc)
            cross_v.append(vc)
        w, b = self.norm_w, self.norm_b
        if w is not None and b is not None:
            y = F.layer_norm(y, [self.d_model], w, b, self.norm_eps)
        return self.lm_head(y[:, 0]), x, new_k, new_v, cross_k, cross_v


def scriptable(model: nn.Module) -> str | None:
    """None when :func:`script_decoder` can script ``model`` (a ``TransformerSeq2Seq``), else why not."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not all(hasattr(model, a) for a in ("tgt_embed", "src_embed", "encoder", "lm_head")):
        return "not a Transformer encoder-decoder"
    if model.training:
        return "in training mode"
    layers = [model.lm_head]
    stacks = [(layer, (layer.self_attn, layer.cross_attn)) for layer in decoder.layers]
    stacks += [(layer, (layer.self_attn,)) for layer in model.encoder.layers]
    for layer, attns in stacks:
        for attn in attns:
            if attn.fused_qkv:
                return "its attention projections are fused"
            layers += [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj]
        if not isinstance(layer.ff.activation, (nn.GELU, nn.ReLU)):
            return f"its activation {type(layer.ff.activation).__name__} has no scripted form"
        layers += [layer.ff.linear1, layer.ff.linear2]
    for layer in layers:
        why = scriptable_linear(layer)
        if why is not None:
            return why
    if any(e.embedding.weight.dtype != torch.float32 for e in (model.tgt_embed, model.src_embed)) \
            or model.positions.table.dtype != torch.float32:
        return "its embeddings are not fp32"
    return None


def script_decoder(model: nn.Module) -> torch.jit.ScriptModule:
    """The scripted decoding step of ``model`` (see :func:`scriptable`); ValueError when it has none."""
    why = scriptable(model)
    if why is not None:
        raise ValueError(f"cannot script this model's decoding step: {why}")
    return script(_Decoder(model))
