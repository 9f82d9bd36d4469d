"""Text with square brackets ("[SEP]", "[/laughs]") is printed as it is by `chatforge generate` and by the sample
replies `chatforge train` ends with: rich read it as markup, so "[bold]" vanished and a closing tag such as
"[/x]" ended the command with a MarkupError traceback (for train, after the whole training)."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from chatforge.cli import app

ODD = "[/laughs] see [bold]you[/bold]"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("h5-brackets")
    with (root / "chat.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Q", "A", "label"])
        for i in range(40):
            w.writerow([f"question {i} [/q]", f"{ODD} {i}", 0])
    (root / "c.yaml").write_text(f"""name: h5-brackets
seed: 0
data: {{path: {root / 'chat.csv'}, format: chatbot_csv, valid_fraction: 0.1, test_fraction: 0.1}}
tokenizer: {{vocab_size: 60, on_vocab_too_large: lower}}
model: {{family: transformer, task: generation, d_model: 16, n_heads: 2, num_encoder_layers: 1,
        num_decoder_layers: 1, d_ff: 32}}
train: {{epochs: 1, max_steps: 2, batch_size: 16, max_source_len: 16, max_target_len: 8}}
tracking: {{enabled: false}}
""")
    r = CliRunner().invoke(app, ["train", str(root / "c.yaml"), "--run-dir", str(root / "run"), "--no-progress"])
    return root / "run", r


def test_train_prints_sample_replies_with_brackets_verbatim(run):
    _, r = run
    assert r.exit_code == 0, (r.output, r.exception)
    assert "Q: question" in r.output and "[/q]" in r.output and f"ref: {ODD}" in r.output


def test_generate_prints_the_message_and_reply_verbatim(run):
    run_dir, _ = run
    r = CliRunner().invoke(app, ["generate", str(run_dir / "bundle"), "question 3 [/q] [bold]"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "you: question 3 [/q] [bold]" in r.output and "bot:" in r.output
