"""The Armijo backtracking line search: its settings and the search loop (`backtrack`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["ArmijoLineSearch", "resolve_line_search", "backtrack"]


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


def backtrack(
    loss_at: Callable[[float], float], loss: float, g_dot_s: float, line_search: ArmijoLineSearch | None, t_prev: float
) -> tuple[float, float, int]:
    """(t, L(w + t·s), tries): loss_at(t) moves the parameters to w + t·s and returns the loss there;
    t = min(growth · t_prev, 1), then ×shrink, until L(w + ts) ≤ L + c1·t·gᵀs; t = 0.0 when no
    try passes (the parameters are then at the last try). Without a line search: t = 1, one try."""
    ls = line_search
    t = 1.0 if ls is None else min(ls.growth * t_prev, 1.0)
    for tries in range(1, (1 if ls is None else ls.max_tries) + 1):
        trial = loss_at(t)
        if ls is None or (math.isfinite(trial) and trial <= loss + ls.c1 * t * g_dot_s):
            return t, trial, tries
        t *= ls.shrink
    return 0.0, trial, tries
