"""Field types shared by the families' typed configs (pydantic validates them at config load)."""

from typing import Annotated

from pydantic import Field

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
