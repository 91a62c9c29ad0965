"""The demo's tuning: each optimizer's learning rate (EGN's damping) chosen on a validation split
of the training rows, so that the comparison is between tuned optimizers (egn-fast demo).

`validation_split` divides a Dataset's training rows (the benchmarks' tuning uses it too);
`tune` trains one optimizer per grid value with `training.train` and returns the best value by
the final validation metric.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import NonFiniteError, SolveError
from .training import Dataset, train

__all__ = ["TUNING_GRIDS", "validation_split", "tune"]


def validation_split(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """The training split divided into train' and a validation set of `fraction` of its rows
    (returned as the "test" split, for tuning); the test split is not touched."""
    n = len(data.X_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction))
    val, tr = order[:n_val], order[n_val:]
    return Dataset(data.name, data.task, data.X_train[tr], data.y_train[tr], data.X_train[val], data.y_train[val],
                   data.num_outputs)


# The demo's grids: the hyperparameter each optimizer is tuned on and its values (EGN's lr stays 1).
TUNING_GRIDS = {
    "egn": ("damping", (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)),
    "adam": ("lr", (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "sgd": ("lr", (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
}


def tune(
    validation: Dataset, optimizer: str, axis: str, grid: tuple[float, ...], steps: int, options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[float, dict[float, float]]:
    """`train` the optimizer once per value of `axis` in `grid` on `validation` (a split of the
    training data: its "test" rows are the validation rows) and return the value with the best
    final validation metric, and every value's metric. A run that diverges (non-finite metric or
    loss, a failed solve) ranks last."""
    higher_is_better = validation.task == "classification"
    worst = -math.inf if higher_is_better else math.inf
    scores = {}
    for value in grid:
        try:
            history = train(validation, optimizer, steps, eval_every=steps, **{**(options or {}), **kwargs, axis: value})
            final = history.test_metric[-1]
            scores[value] = final if math.isfinite(final) and math.isfinite(history.train_loss[-1]) else worst
        except (NonFiniteError, SolveError):
            scores[value] = worst
    best = (max if higher_is_better else min)(grid, key=lambda v: scores[v])
    return best, scores
