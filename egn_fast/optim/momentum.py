"""Momentum on the LM direction (the functional core of EGN's momentum options).

    "ema":        m ← βm + (1−β)d,  d̂ = m / (1 − βᵗ)   (bias-corrected; t counts committed steps)
    "heavy_ball": v ← βv + d,       d̂ = v
    "nesterov":   v ← βv + d,       d̂ = d + βv
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["MOMENTUM_TYPES", "check_momentum", "momentum_direction"]

MOMENTUM_TYPES = ("ema", "heavy_ball", "nesterov")


def check_momentum(beta: float, kind: str) -> None:
    if not 0 <= beta < 1:
        raise ValueError(f"momentum must be in [0, 1), got {beta}")
    if kind not in MOMENTUM_TYPES:
        raise ValueError(f"unknown momentum_type {kind!r}; expected 'ema', 'heavy_ball' or 'nesterov'")


def momentum_direction(
    d: list[Tensor], old: list[Tensor | None], beta: float, kind: str, steps: int
) -> tuple[list[Tensor], list[Tensor] | None]:
    """(d̂, new buffers) from the direction d and the buffers of the last committed step (None
    where there is none yet); steps: committed momentum steps so far. β = 0: (d, None)."""
    if beta == 0:
        return d, None
    if kind == "ema":
        buffers = [(1 - beta) * x if m is None else beta * m + (1 - beta) * x for m, x in zip(old, d)]
        correction = 1 - beta ** (steps + 1)
        return [m / correction for m in buffers], buffers
    buffers = [x.clone() if m is None else beta * m + x for m, x in zip(old, d)]
    if kind == "heavy_ball":
        return buffers, buffers
    return [x + beta * m for x, m in zip(d, buffers)], buffers
