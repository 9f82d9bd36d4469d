"""A tiny sweep set-up the CLI sweep tests share: a one-layer Transformer classifier on the shipped sample corpus that
trains two steps, and a one-key space (``model.d_ff``, two choices)."""

from __future__ import annotations

from pathlib import Path

TINY_CONFIG = """name: NAME
seed: 0
data: {path: sample, valid_fraction: 0.1, test_fraction: 0.0}
tokenizer: {vocab_size: 600}
model: {family: transformer, task: classification, d_model: 32, n_heads: 2, num_encoder_layers: 1, d_ff: 64,
        dropout: 0.0}
train: {epochs: 1, max_steps: 2, batch_size: 160, num_threads: 1, device: cpu}
tracking: {enabled: false}
output: {dir: OUT}
"""
SPACE = "model.d_ff: {type: categorical, choices: [32, 64]}\n"


def write_tiny_sweep(folder: Path, name: str, space_file: str = "s.yaml") -> tuple[Path, Path]:
    """``folder/c.yaml`` (runs under ``folder/runs``) and ``folder/<space_file>``; returns both paths."""
    config, space = folder / "c.yaml", folder / space_file
    config.write_text(TINY_CONFIG.replace("NAME", name).replace("OUT", str(folder / "runs")))
    space.write_text(SPACE)
    return config, space
