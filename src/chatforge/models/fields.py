"""Field types shared by the families' typed configs (pydantic validates them at config load)."""

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _not_a_boolean(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; a size of `yes` is a mistake, not one
    if isinstance(value, bool):
        raise ValueError("expected a number, not a YAML boolean (true/false, yes/no, on/off)")
    return value


PositiveInt = Annotated[int, BeforeValidator(_not_a_boolean), Field(gt=0)]
Probability = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=0.0, lt=1.0)]
