"""Argument checks shared by `direction`/`build_system`, `EGN`, `SGN` and `EGNPreconditioner`:
one definition of what a valid damping, lr, loss, model and parameter list is, and one wording
of the error for each."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from .losses import NAMED_LOSSES, AutogradLoss, Loss

__all__ = [
    "LossSpec",
    "resolve_loss",
    "finite_nonnegative",
    "check_damping",
    "check_lr",
    "check_seq_method",
    "check_model",
    "check_params_in_model",
    "trainable",
    "group_of",
]

LossSpec = str | Loss | Callable[[Tensor, Tensor], Tensor]
SEQ_METHODS = ("auto", "ghost", "per_sample")


def resolve_loss(loss: LossSpec) -> Loss:
    """Turn "mse" | "cross_entropy" | "bce" | a Loss object | a per-sample callable into a Loss."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in NAMED_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(NAMED_LOSSES)} or a Loss object")
        return NAMED_LOSSES[loss]()
    if callable(loss):
        return AutogradLoss(loss)
    raise ValueError(f"loss must be a name, a Loss object or a per-sample callable, got {type(loss).__name__}")


def finite_nonnegative(name: str, value: Any) -> float:
    """`value` as a float, or ValueError unless it is a finite real number ≥ 0 (not a bool or a string)."""
    try:
        number = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with several elements
        number = math.nan
    if not 0 <= number < math.inf:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return number


def check_damping(damping: Any) -> float:
    """λ in (H + λI): a finite number ≥ 0."""
    return finite_nonnegative("damping", damping)


def check_lr(lr: Any) -> float:
    """A step multiplier: a finite number ≥ 0."""
    return finite_nonnegative("lr", lr)


def check_seq_method(seq_method: str) -> str:
    if seq_method not in SEQ_METHODS:
        raise ValueError(f"unknown seq_method {seq_method!r}; expected 'auto', 'ghost' or 'per_sample'")
    return seq_method


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_params_in_model(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    owned = {id(p) for p in check_model(model).parameters()}
    if any(id(p) not in owned for p in params):
        raise ValueError("every parameter in the optimizer's param groups must be a parameter of the model")


def trainable(groups: list[dict[str, Any]]) -> list[nn.Parameter]:
    """The parameters of torch param groups that require grad, in group order."""
    return [p for g in groups for p in g["params"] if p.requires_grad]


def group_of(groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """id(parameter) → its param group. Directions come in model.parameters() order, which the
    groups need not follow, so per-group settings are looked up by identity."""
    return {id(p): g for g in groups for p in g["params"]}
