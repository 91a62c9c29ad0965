"""The two errors of egn_fast's own (bad arguments raise ValueError)."""

from __future__ import annotations

__all__ = ["NonFiniteError", "SolveError"]


class NonFiniteError(ValueError):
    """The model's outputs, the loss or the Gram hold nan/inf at the current parameters."""


class SolveError(RuntimeError):
    """The damped system could not be factored even with the largest jitter."""
