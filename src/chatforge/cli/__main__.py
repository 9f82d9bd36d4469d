"""`python -m chatforge.cli` (torchrun launches training this way)."""

from chatforge.cli import main

main()
