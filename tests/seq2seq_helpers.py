"""Shared by the overfit tests: one padded encoder-decoder batch and the overfit loop."""

from __future__ import annotations

import torch


def seq2seq_batch(pairs: list[tuple[list[int], list[int]]], pad: int, bos: int, eos: int):
    """(source, target) id lists -> src (B, S) right-padded, decoder input (B, T) = <s> + target,
    labels (B, T) = target + </s>, padding ignored (-100)."""
    s_w, t_w = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs) + 1
    src = torch.tensor([s + [pad] * (s_w - len(s)) for s, _ in pairs])
    dec = torch.tensor([[bos] + t + [pad] * (t_w - 1 - len(t)) for _, t in pairs])
    lab = torch.tensor([t + [eos] + [-100] * (t_w - 1 - len(t)) for _, t in pairs])
    return src, dec, lab


def overfit(model: torch.nn.Module, src, dec, lab, lr: float, steps: int = 300) -> float:
    """Adam on one encoder-decoder batch until the loss is under 0.01 (or ``steps``); returns the
    last loss and leaves the model in eval mode."""
    return overfit_batch(model, (src, dec), {"labels": lab}, lr, steps)


def overfit_batch(model: torch.nn.Module, args: tuple, kwargs: dict, lr: float, steps: int = 300) -> float:
    """The same loop for any model called as ``model(*args, **kwargs)`` that returns ``.loss``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(*args, **kwargs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    return loss.item()
