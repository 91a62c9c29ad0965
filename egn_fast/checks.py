"""Argument checks shared by `direction`/`build_system`, `EGN`, `SGN` and `EGNPreconditioner`:
one definition of what a valid damping, lr, loss, model and parameter list is, and one wording
of the error for each."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from .losses import NAMED_LOSSES, AutogradLoss, BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss, ScaledLoss

__all__ = [
    "LossSpec",
    "resolve_loss",
    "from_torch_loss",
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
    """Turn "mse" | "cross_entropy" | "bce" | a Loss object | torch's MSELoss / CrossEntropyLoss /
    BCEWithLogitsLoss module | a per-sample callable into a Loss."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in NAMED_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(NAMED_LOSSES)} or a Loss object")
        return NAMED_LOSSES[loss]()
    if isinstance(loss, nn.modules.loss._Loss):  # a batch loss, not a per-sample callable
        return from_torch_loss(loss)
    if callable(loss):
        return AutogradLoss(loss)
    raise ValueError(f"loss must be a name, a Loss object or a per-sample callable, got {type(loss).__name__}")


# torch loss module → (our loss, factor, divided by c): the module's value with reduction="mean"
# is exactly the batch mean of factor/c · ℓ_i (MSELoss: mean of (f−y)² over b·c entries = (2/c)·½‖f−y‖²).
TORCH_LOSSES: dict[type[nn.Module], tuple[type[Loss], float, bool]] = {
    nn.MSELoss: (MSELoss, 2.0, True),
    nn.CrossEntropyLoss: (CrossEntropyLoss, 1.0, False),
    nn.BCEWithLogitsLoss: (BCEWithLogitsLoss, 1.0, True),
}
# option → its default; any other value changes the loss away from a plain batch mean
TORCH_LOSS_DEFAULTS = {"weight": None, "pos_weight": None, "label_smoothing": 0.0, "ignore_index": -100}


def from_torch_loss(module: nn.Module) -> Loss:
    """The egn_fast loss whose batch value equals torch's loss `module` (MSELoss, CrossEntropyLoss
    or BCEWithLogitsLoss with reduction="mean" and default options): its r, Q and hence H, g and
    the meaning of λ are the module's, so the direction is the module's own LM direction."""
    kind = type(module).__name__
    if type(module) not in TORCH_LOSSES:
        raise ValueError(
            f"loss=torch.nn.{kind}() is not supported; use torch.nn.MSELoss(), CrossEntropyLoss() or "
            f"BCEWithLogitsLoss(), a named loss {sorted(NAMED_LOSSES)}, or a per-sample callable "
            "fn(f_i, y_i) -> scalar such as lambda f, y: F.huber_loss(f, y, reduction='sum')"
        )
    if module.reduction != "mean":
        raise ValueError(
            f"loss=torch.nn.{kind}(reduction={module.reduction!r}) is not supported: egn_fast's loss is a "
            "batch mean; use reduction='mean'"
        )
    options = {k: getattr(module, k) for k in TORCH_LOSS_DEFAULTS if hasattr(module, k)}
    changed = [k for k, v in options.items() if (v is not None if TORCH_LOSS_DEFAULTS[k] is None else v != TORCH_LOSS_DEFAULTS[k])]
    if changed:
        raise ValueError(
            f"loss=torch.nn.{kind}({', '.join(f'{k}=' + ('…' if isinstance(options[k], Tensor) else repr(options[k])) for k in changed)}) is not supported: only the default "
            f"options are; for a weighted or smoothed loss pass a per-sample callable fn(f_i, y_i) -> scalar"
        )
    base, factor, per_output = TORCH_LOSSES[type(module)]
    if factor == 1 and not per_output:
        return base()
    return ScaledLoss(base(), factor, per_output, f"torch.nn.{kind}")


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
