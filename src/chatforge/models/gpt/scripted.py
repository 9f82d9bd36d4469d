"""GPT's decoding step as one TorchScript graph: the same arithmetic as ``GPTModel.decode`` + the LM head,
run by TorchScript's interpreter, which releases the GIL for the whole step.

Why: served, the scheduler thread shares the interpreter with the gRPC event loop (and the store's writer).
An eager step calls about 120 torch ops, and each one gives the GIL up and takes it back; when the loop
holds it (writing the last step's tokens), the step waits, and on 2 CPUs the loop's thread may itself
be waiting for a CPU. On the trained ChatbotData GPT (4 layers, d_model 256; AMD EPYC Zen 4, 2 vCPUs) an
eager step took 1.3-1.5 ms in process and 2.0-2.2 ms timed inside the server under one stream; a thread
beside it that holds the GIL 200 us in every 1.2 ms slowed the eager step by 25 % and the scripted one by
2-12 %. A scripted step takes the GIL back once, at its end, whatever the load
(``benchmarks/served_generation.py --eager-step`` serves both side by side).

Only what the eager step computes, in the same order and with the same kernels (``F.linear``, oneDNN's
prepacked matmul or the one-row ``addmm`` on a transposed copy, chosen per call by the layer's
:class:`~chatforge.modules.linear.PackPolicy` as :class:`~chatforge.modules.linear.PackedLinear` does), so
the logits are bitwise those of the eager step (tested). The keys and values are written into the
:class:`~chatforge.modules.GrowingKVCache` buffers, which the caller grows first. Built for fp32 models and
dynamically quantized int8 ones (their layers run ``quantized::linear_dynamic``, as their own forward does) with
fused QKV projections and a GELU or ReLU MLP; anything else (bf16, unknown layers) decodes eagerly
(:func:`scriptable` says why not).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatforge.modules.scripted import (
    DECODE_STEP_ENV,
    decode_step_mode,
    script,
    scriptable_linear,
    scripted_linear,
)

__all__ = ["DECODE_STEP_ENV", "decode_step_mode", "script_decoder", "scriptable"]

class _Block(nn.Module):
    """``chatforge.models.gpt.model._decode_block`` over explicit cache buffers."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.norm_first = bool(block.norm_first)
        self.d_model, self.n_heads, self.head_dim = int(attn.d_model), int(attn.n_heads), int(attn.head_dim)
        self.ln1_w, self.ln1_b, self.eps1 = block.ln_1.weight.detach(), block.ln_1.bias.detach(), float(block.ln_1.eps)
        self.ln2_w, self.ln2_b, self.eps2 = block.ln_2.weight.detach(), block.ln_2.bias.detach(), float(block.ln_2.eps)
        self.qkv, self.out = scripted_linear(attn.qkv_proj), scripted_linear(attn.out_proj)
        self.fc1, self.fc2 = scripted_linear(mlp.linear1), scripted_linear(mlp.linear2)
        act = mlp.activation
        self.relu = isinstance(act, nn.ReLU)
        self.approximate = "none" if self.relu else str(act.approximate)

    def _attend(self, h: Tensor, mask: Tensor | None, k_buf: Tensor, v_buf: Tensor, start: int,
                prefill: bool) -> Tensor:
        b, t = h.size(0), h.size(1)
        if prefill:  # MultiHeadAttention.forward: split, then heads; causal unless a mask says more
            qkv = self.qkv(h).split(self.d_model, dim=-1)
            q = qkv[0].view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = qkv[1].view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            v = qkv[2].view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        else:  # MultiHeadAttention.cached_self_attention (decoding)
            qkv = self.qkv(h).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        end = start + t
        k_buf[:, :, start:end] = k
        v_buf[:, :, start:end] = v
        if prefill:
            y = F.scaled_dot_product_attention(q, k_buf[:, :, :end], v_buf[:, :, :end], attn_mask=mask,
                                               dropout_p=0.0, is_causal=mask is None)
        else:
            y = F.scaled_dot_product_attention(q, k_buf[:, :, :end], v_buf[:, :, :end], attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, self.d_model))

    def _mlp(self, h: Tensor) -> Tensor:
        z = self.fc1(h)
        z = F.relu(z) if self.relu else F.gelu(z, approximate=self.approximate)
        return self.fc2(z)

    def forward(self, x: Tensor, mask: Tensor | None, k_buf: Tensor, v_buf: Tensor, start: int,
                prefill: bool) -> Tensor:
        shape = [self.d_model]
        if self.norm_first:
            h = F.layer_norm(x, shape, self.ln1_w, self.ln1_b, self.eps1)
            x = x + self._attend(h, mask, k_buf, v_buf, start, prefill)
            return x + self._mlp(F.layer_norm(x, shape, self.ln2_w, self.ln2_b, self.eps2))
        x = F.layer_norm(x + self._attend(x, mask, k_buf, v_buf, start, prefill), shape, self.ln1_w, self.ln1_b,
                         self.eps1)
        return F.layer_norm(x + self._mlp(x), shape, self.ln2_w, self.ln2_b, self.eps2)


class _Decoder(nn.Module):
    """Token ids and positions -> next-token logits, over every layer's cache buffers."""

    ln_f_w: Tensor | None
    ln_f_b: Tensor | None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        tr = model.transformer
        self.wte, self.wpe = tr.wte.embedding.weight.detach(), tr.wpe.embedding.weight.detach()
        self.blocks = nn.ModuleList(_Block(b) for b in tr.blocks)
        ln = tr.ln_f
        self.ln_f_w = None if ln is None else ln.weight.detach()
        self.ln_f_b = None if ln is None else ln.bias.detach()
        self.ln_f_eps = 1e-5 if ln is None else float(ln.eps)
        self.d_model = int(tr.cfg.d_model)
        self.lm_head = scripted_linear(model.lm_head)
        self.vocab_size = int(model.vocab_size)

    def _layers(self, x: Tensor, mask: Tensor | None, k_bufs: list[Tensor], v_bufs: list[Tensor],
                start: int, prefill: bool) -> Tensor:
        i = 0
        for block in self.blocks:
            x = block(x, mask, k_bufs[i], v_bufs[i], start, prefill)
            i += 1
        w, b = self.ln_f_w, self.ln_f_b
        if w is not None and b is not None:
            x = F.layer_norm(x, [self.d_model], w, b, self.ln_f_eps)
        return x

    def _vocab(self, logits: Tensor) -> Tensor:
        return logits[..., : self.vocab_size] if logits.size(-1) != self.vocab_size else logits

    def forward(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None, k_bufs: list[Tensor],
                v_bufs: list[Tensor], start: int) -> Tensor:
        """Decoding: ``GPTModel.decode`` + the LM head -> logits (B, T, V)."""
        x = F.embedding(input_ids, self.wte) + F.embedding(position_ids, self.wpe)  # (B, T, D)
        x = self._layers(x, mask, k_bufs, v_bufs, start, False)
        if x.size(1) == 1:  # one token per row: the eager step's (B, D) call, then (B, 1, V)
            return self._vocab(self.lm_head(x[:, 0]).unsqueeze(1))
        return self._vocab(self.lm_head(x))

    @torch.jit.export
    def prefill(self, input_ids: Tensor, position_ids: Tensor | None, mask: Tensor | None,
                k_bufs: list[Tensor], v_bufs: list[Tensor]) -> Tensor:
        """The prompt (B, W) into empty caches (``GPTModel.forward`` with caches, eval mode) and the last
        position's next-token logits (B, V) (``prefill_rows(feed_last=True)``)."""
        x = self._layers(self._prompt(input_ids, position_ids), mask, k_bufs, v_bufs, 0, True)
        return self._vocab(self.lm_head(x[:, -1]))

    @torch.jit.export
    def fill(self, input_ids: Tensor, position_ids: Tensor | None, mask: Tensor | None, k_bufs: list[Tensor],
             v_bufs: list[Tensor]) -> None:
        """The prompt (B, W) into empty caches, no logits: the first of an int8 model's two prefill passes
        (``prefill_rows`` without ``feed_last``)."""
        self._layers(self._prompt(input_ids, position_ids), mask, k_bufs, v_bufs, 0, True)

    def _prompt(self, input_ids: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:
            pos = F.embedding(torch.arange(0, input_ids.size(1), device=input_ids.device), self.wpe)[None]
        else:
            pos = F.embedding(position_ids, self.wpe)
        return F.embedding(input_ids, self.wte) + pos


def scriptable(model: nn.Module) -> str | None:
    """None when :func:`script_decoder` can script ``model`` (a ``GPTLMHeadModel``), else why not."""
    tr = getattr(model, "transformer", None)
    if tr is None or not hasattr(model, "lm_head"):
        return "not a GPT language model"
    if model.training:
        return "in training mode"
    layers = [model.lm_head]
    for block in tr.blocks:
        attn, mlp = block.attn, block.mlp
        if not attn.fused_qkv:
            return "its attention projections are not fused"
        if not isinstance(mlp.activation, (nn.GELU, nn.ReLU)):
            return f"its activation {type(mlp.activation).__name__} has no scripted form"
        layers += [attn.qkv_proj, attn.out_proj, mlp.linear1, mlp.linear2]
    for layer in layers:
        why = scriptable_linear(layer)
        if why is not None:
            return why
    if tr.wte.embedding.weight.dtype != torch.float32:
        return "its embeddings are not fp32"
    return None


def script_decoder(model: nn.Module) -> torch.jit.ScriptModule:
    """The scripted decoding step of ``model`` (see :func:`scriptable`); ValueError when it has none."""
    why = scriptable(model)
    if why is not None:
        raise ValueError(f"cannot script this model's decoding step: {why}")
    return script(_Decoder(model))
