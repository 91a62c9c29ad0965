"""`ModelOptimizer`: what EGN and SGN share as torch optimizers bound to a model."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..checks import check_model, check_params_in_model
from ..losses import LossSpec, resolve_loss

__all__ = ["ModelOptimizer", "ParamGroups"]

ParamGroups = Iterable[nn.Parameter] | Iterable[dict[str, Any]]


class ModelOptimizer(torch.optim.Optimizer):
    """A torch optimizer that runs its model itself: param groups (default: every parameter of
    `model`; all must belong to it, torch-style dicts may set per-group defaults), the model and
    the loss (egn_fast.losses.resolve_loss)."""

    def __init__(self, model: nn.Module, loss: LossSpec, params: ParamGroups | None, defaults: dict[str, Any]) -> None:
        super().__init__(check_model(model).parameters() if params is None else params, defaults)
        check_params_in_model(model, [p for g in self.param_groups for p in g["params"]])
        self.model = model
        self.loss_fn = resolve_loss(loss)
