"""chatforge GPT vs Hugging Face ``GPT2LMHeadModel``: the training step and greedy generation calls that
``chatforge bench`` and ``benchmarks/gpt_vs_hf.py`` both time (one copy of the logic)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from chatforge.bench.timing import autocast, median_time
from chatforge.decoding import GenerationOptions, generate_batch


def shifted_labels(x: torch.Tensor) -> torch.Tensor:
    """chatforge's GPT takes labels already shifted by one (HF shifts inside the model)."""
    return torch.cat([x[:, 1:], torch.full((x.size(0), 1), -100)], 1)


def train_steps_fn(model: torch.nn.Module, is_hf: bool, x: torch.Tensor, steps: int,
                   precision: str, losses: list[float] | None = None) -> Callable[[], None]:
    """``steps`` optimizer steps (forward + backward + AdamW) on the token batch ``x`` (B, T); the model
    is put in train mode. Both sides predict the same next tokens. chatforge's forwards run as its Trainer runs
    them (fp32 linear layers on oneDNN's matmul where ``training.trainer.fp32_training_linear`` picks it)."""
    from chatforge.training.trainer import fp32_training_linear

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = x if is_hf else shifted_labels(x)
    mode = None if is_hf else fp32_training_linear(precision, x.device)

    def run():
        for _ in range(steps):
            with autocast(precision), (mode if mode is not None else nullcontext()):
                loss = model(x, labels=labels).loss
            if losses is not None:  # each step's loss, for agreement checks (costs a sync)
                losses.append(loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def training_linear_kernels(precision: str) -> str:
    """What chatforge's fp32 linear layers train on here ("oneDNN" or "torch"), for a report."""
    from chatforge.training.trainer import fp32_training_linear

    return "oneDNN" if fp32_training_linear(precision, torch.device("cpu")) is not None else "torch"


def greedy_fn(model, is_hf: bool, prompts: torch.Tensor, new_tokens: int, precision: str, *, pad_id: int,
              bos_id: int, eos_id: int, inference: bool = True, out: list | None = None,
              context: Callable[[], AbstractContextManager] | None = None) -> Callable[[], None]:
    """Greedy generation of exactly ``new_tokens`` tokens (min = max, so both sides do the same work) for
    the (B, T) ``prompts``; the token ids of the last call land in ``out`` when given.

    chatforge is called as a user calls it (``generate_batch`` inside inference mode and autocast).
    ``context`` replaces the precision's autocast (e.g. ``lambda: autocast_for(model)`` for a model
    that ``load_model`` prepared for its precision)."""
    opts = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rows = prompts.tolist()

    def run():
        with torch.inference_mode(inference), (context() if context else autocast(precision)):
            if is_hf:
                ids = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                                     eos_token_id=eos_id)[:, prompts.size(1):].tolist()
            else:
                ids = generate_batch(model, rows, opts, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
        if out is not None:
            out[:] = ids

    return run


def hf_gen_time(hf, prompts: torch.Tensor, new_tokens: int, precision: str, reps: int, **ids) -> float:
    """HF's faster of two ways to call ``generate``: inside ``torch.inference_mode()``, or with only
    its own ``no_grad`` (under bf16 autocast that is faster, since autocast caches its weight casts
    only outside inference mode). The reference gets its best, not the way that suits chatforge."""
    return min(median_time(greedy_fn(hf, True, prompts, new_tokens, precision, inference=inference, **ids), reps)
               for inference in (True, False))


def gpt_train_flops_per_token(n_layers: int, d_model: int, d_ff: int, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x the matmul weights (blocks and the
    vocabulary head) plus the attention scores and weighted sum, 12 x layers x seq_len x d_model."""
    matmul_params = n_layers * (4 * d_model * d_model + 2 * d_model * d_ff) + vocab * d_model
    return 6 * matmul_params + 12 * n_layers * seq_len * d_model
