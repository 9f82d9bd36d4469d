"""Model families. Each module registers itself with :mod:`chatforge.registry` on import."""

from chatforge.models import bytenet, elmo, transformer  # noqa: F401
