"""The dashboard's error ratio counts what the error-rate alert counts. It counted every status but OK, so a caller's
INVALID_ARGUMENT or the chat page's stop button (CANCELLED) raised the panel that docs/operations.md compares with the
alert's 5 % threshold, while the alert (alert_rules.SERVER_FAULT_CODES) rightly ignored them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from chatforge.serving.alert_rules import SERVER_FAULT_CODES
from chatforge.serving.metrics import FAILURE_REASONS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "chatforge-dashboard.json"


def test_the_error_ratio_panel_counts_the_alerts_codes():
    panels = [p for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"] if "error ratio" in p["title"].lower()]
    assert len(panels) == 1
    [target] = panels[0]["targets"]
    numerator = target["expr"].split(" / ", 1)[0]
    match = re.search(r'status=~\\?"([A-Z_|]+)\\?"', numerator)
    assert match is not None and "status!=" not in numerator, numerator
    assert set(match.group(1).split("|")) == SERVER_FAULT_CODES
    # A DEADLINE_EXCEEDED whose caller allowed less than the latency budget is not the server's fault for the
    # alert (alert_rules.is_server_fault); the panel takes those out through their failure reason.
    assert re.search(r'- \(sum\(rate\(chatforge_request_failure_total\{[^}]*reason="short_deadline"[^}]*\}'
                     r'\[\$__rate_interval\]\)\) or vector\(0\)\)', numerator), numerator
    assert "short_deadline" in FAILURE_REASONS
    # ... and says so where the panel is read (its description; docs/operations.md's dashboard table)
    assert "short_deadline" in panels[0]["description"]
    operations = (DASHBOARD.parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    [row] = [line for line in operations.splitlines() if line.startswith("| Server error ratio")]
    assert "short_deadline" in row
