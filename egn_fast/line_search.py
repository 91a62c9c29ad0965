"""The Armijo backtracking line search's settings (the search loop itself is `EGN._search`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArmijoLineSearch", "resolve_line_search"]


@dataclass(frozen=True)
class ArmijoLineSearch:
    """Backtracking on the step multiplier t: accept when L(w + s) ≤ L(w) + c1 · gᵀs."""

    c1: float = 0.1
    shrink: float = 0.8
    max_tries: int = 15
    growth: float = 1.5

    def __post_init__(self) -> None:
        if not (0 < self.c1 < 1 and 0 < self.shrink < 1 and self.max_tries >= 1 and self.growth >= 1):
            raise ValueError(f"invalid line search settings {self}: need 0<c1<1, 0<shrink<1, max_tries≥1, growth≥1")


def resolve_line_search(value: object) -> ArmijoLineSearch | None:
    """None | "armijo" (the defaults) | an ArmijoLineSearch."""
    if value == "armijo":
        return ArmijoLineSearch()
    if not (value is None or isinstance(value, ArmijoLineSearch)):
        raise ValueError(f"line_search must be None, 'armijo' or an ArmijoLineSearch, got {value!r}")
    return value
