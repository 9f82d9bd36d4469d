"""Model families. Each module registers itself with :mod:`chatforge.registry` on import."""

from chatforge.models import (
    bert,  # noqa: F401
    bytenet,  # noqa: F401
    elmo,  # noqa: F401
    gpt,  # noqa: F401
    transformer,  # noqa: F401
)
