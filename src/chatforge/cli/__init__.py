"""The `chatforge` command line: parse, call the library, render with rich. No logic here.

Every command imports the library inside its own function, never at the top of its module: the
client commands (health, chat, loadtest, top) must not pay for torch, scikit-learn or MLflow
(seconds of imports; a container HEALTHCHECK runs `chatforge health` with a 4 s timeout).
tests/client/test_channel.py checks that they import none of them.

One typer app (``app``, in :mod:`._shared`), its commands split by audience: :mod:`.research`
(configs, tokenizers, data, train, sweep, generate, evaluate, compare, convert, bundle), :mod:`.serve`
(``serve``), :mod:`.ops` (chat, health, loadtest, top, conversations) and :mod:`.bench` (``bench``). Importing this
package registers them all; ``main`` is the ``chatforge`` entry point.
"""

from __future__ import annotations

import sys

# Importing each audience module registers its commands; this order is the order of `--help`.
from chatforge.cli import research  # noqa: F401

# isort: split
from chatforge.cli import serve  # noqa: F401

# isort: split
from chatforge.cli import ops  # noqa: F401

# isort: split
from chatforge.cli import bench  # noqa: F401

# isort: split
from chatforge.cli._shared import app

__all__ = ["app", "main"]


def main() -> None:
    # Before any command imports torch: its OpenMP runtime reads the wait policy once, when it loads
    # (chatforge.runtime.set_omp_wait_policy says why PASSIVE after a short spin). Child processes (torchrun) inherit it.
    from chatforge.runtime import set_omp_wait_policy

    set_omp_wait_policy()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
