"""What a benchmark run records about the machine: CPU model and flags, CPUs available, load, peak RSS.

``cpu_info()`` and ``cpus_available()`` are :mod:`chatforge.runtime`'s, so a report and the server describe and
size CPUs the same way (affinity capped by the cgroup quota).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

from chatforge.runtime import available_cpus
from chatforge.runtime import cpu_info as runtime_cpu_info


def cpus_available() -> int:
    """CPUs this process can keep busy: :func:`chatforge.runtime.available_cpus`, its affinity mask (which a
    container's cpuset narrows) capped by the cgroup CPU quota (``--cpus 1``, a Kubernetes CPU limit). The
    affinity alone gave a 1-CPU container 2 threads on this 2-CPU host: every parallel kernel then waited for
    a thread the quota had not scheduled, and the run measured the oversubscription, not the engines."""
    return available_cpus()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def cpu_info() -> dict[str, Any]:
    """JSON-able: CPU model name and flags, CPUs (logical, affinity, cgroup quota, available), the load average
    now and torch's threads (:func:`chatforge.runtime.cpu_info`, the serving runtime's own)."""
    return dict(runtime_cpu_info())


def is_loaded(loads: list[list[float]], cpus: int) -> bool:
    """A run is loaded when the 1-minute load before or after it exceeds the CPUs it may use: other
    processes then shared the cores, and only ratios measured back to back mean anything."""
    return any(snap and snap[0] > cpus for snap in loads)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so the next reading is this case's peak.
    Linux only ("5" to clear_refs); False where it cannot, and the reading is then the process's peak."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux


def lscpu_model() -> str:
    """``lscpu``'s "Model name" (the CPU every benchmark figure records), or "unknown"."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"
