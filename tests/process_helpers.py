"""Processes for tests about what a killed process leaves behind."""

from __future__ import annotations

import subprocess
import sys


def dead_pid() -> int:
    """The pid of a process of this host that has exited (a child that printed its pid and was reaped): what a
    SIGKILLed writer's or training's recorded pid looks like afterwards."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True, timeout=60)
    return int(p.stdout)
