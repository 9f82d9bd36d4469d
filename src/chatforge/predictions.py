"""What the library hands to serving: typed predictions, free of torch (the client side imports them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenDelta:
    """One generated token and the text it adds to the reply so far (may be "")."""

    token_id: int
    text: str


@dataclass
class ClassPrediction:
    """One text's answer: the final label (``out_of_scope`` when the bundle's oos policy says so, and
    then ``label`` is the policy's oos label), the best class probability and every class's."""

    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    out_of_scope: bool = False
