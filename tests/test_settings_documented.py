"""Every CHATFORGE_* variable the server reads into its settings is documented where an operator looks (README's
Operations section or docs/operations.md). CHATFORGE_LOG_LEVEL (README quotes INFO against WARNING throughput but
named no way to choose), the log file's rotation and the alert window were read and never mentioned."""

from __future__ import annotations

from pathlib import Path

from chatforge.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_every_settings_variable_is_documented():
    docs = (REPO / "README.md").read_text(encoding="utf-8") + (REPO / "docs" / "operations.md").read_text(
        encoding="utf-8")
    missing = [Settings.env_var(f) for f in Settings.model_fields if Settings.env_var(f) not in docs]
    assert not missing, f"read from the environment but documented nowhere: {missing}"
