"""Which losses `loss=` accepts, and how each becomes a `Loss` (docs/design.md §1): a name
("mse", "cross_entropy", "bce"), a `Loss` object, torch's MSELoss / CrossEntropyLoss /
BCEWithLogitsLoss module on its own scale, or a per-sample callable (`AutogradLoss`)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .cross_entropy import CrossEntropyLoss
from .heads import AutogradLoss, BCEWithLogitsLoss, Loss, MSELoss, ScaledLoss

__all__ = ["LossSpec", "NAMED_LOSSES", "resolve_loss", "from_torch_loss"]

LossSpec = str | Loss | Callable[[Tensor, Tensor], Tensor]
# The names `loss=` accepts; a new named loss is one more entry.
NAMED_LOSSES: dict[str, type[Loss]] = {"mse": MSELoss, "cross_entropy": CrossEntropyLoss, "bce": BCEWithLogitsLoss}


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
    changed = _changed_options(module)
    if changed:
        raise ValueError(
            f"loss=torch.nn.{kind}({', '.join(changed)}) is not supported: only the default options are; "
            "for a weighted or smoothed loss pass a per-sample callable fn(f_i, y_i) -> scalar"
        )
    base, factor, per_output = TORCH_LOSSES[type(module)]
    if base is CrossEntropyLoss:  # classes on dim 1 in torch: per-token targets would be misread
        return CrossEntropyLoss(per_token=False)
    if factor == 1 and not per_output:
        return base()
    return ScaledLoss(base(), factor, per_output, f"torch.nn.{kind}")


def _changed_options(module: nn.Module) -> list[str]:
    """"name=value" for each option of TORCH_LOSS_DEFAULTS that `module` has and sets otherwise."""
    changed = []
    for name, default in TORCH_LOSS_DEFAULTS.items():
        value = getattr(module, name, default)
        if value is not default and (default is None or value != default):
            changed.append(f"{name}={'…' if isinstance(value, Tensor) else repr(value)}")
    return changed
