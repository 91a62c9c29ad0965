"""Argument checks shared by `direction`/`build_system`, `EGN`, `SGN` and `EGNPreconditioner`:
one definition of what a valid damping, lr, loss (named, a Loss, a torch loss module, a callable),
model, parameter list, model output and row-space size is, and one wording of the error for each."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .cross_entropy import CrossEntropyLoss
from .losses import AutogradLoss, BCEWithLogitsLoss, Loss, MSELoss, ScaledLoss

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
    "check_trainable",
    "per_sample_outputs",
    "available_memory",
    "check_row_space",
    "trainable",
    "group_of",
]

LossSpec = str | Loss | Callable[[Tensor, Tensor], Tensor]
SEQ_METHODS = ("auto", "ghost", "per_sample")
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
        hint = ""
        if isinstance(model, Iterable):  # EGN(model.parameters()), the torch.optim idiom
            hint = "; pass the model itself, e.g. EGN(model) rather than EGN(model.parameters()), and params=[…] to train only some of its parameters"
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    return model


def check_params_in_model(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    owned = {id(p) for p in check_model(model).parameters()}
    if any(id(p) not in owned for p in params):
        raise ValueError("every parameter in the optimizer's param groups must be a parameter of the model")


def check_trainable(model: nn.Module, params: list[nn.Parameter]) -> torch.device:
    """The one device the trainable parameters live on; refuses several devices and the meta
    device (no values to differentiate)."""
    device = params[0].device
    if any(p.device != device for p in params):
        raise ValueError("the model's trainable parameters lie on several devices; egn_fast needs one")
    if device.type == "meta":
        raise ValueError("the model is on the meta device (parameters without values); load or initialize its weights first, e.g. model.to_empty(device='cpu') and then its init")
    return device


def per_sample_outputs(out: Any) -> Tensor:
    """The model's output (b, …) flattened to (b, c), or a ValueError saying what is wrong with it."""
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor (b, …), got {type(out).__name__}")
    if out.dim() == 0:
        raise ValueError("the model returned a scalar; egn_fast needs per-sample outputs (b, …)")
    if out.shape[0] == 0:
        raise ValueError(f"the batch is empty (outputs of shape {tuple(out.shape)}); pass at least one sample")
    if out[0].numel() == 0:
        raise ValueError(f"the model's outputs {tuple(out.shape)} hold no values per sample")
    return out.reshape(out.shape[0], -1)


# Beyond this many rows a step that fits in memory still factors an m×m matrix (m³/3 flops): warn.
LARGE_ROW_SPACE = 10_000
ROW_SPACE_MATRICES = 3  # peak m×m matrices of a step: K, K + bλI, its Cholesky factor


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device` (CUDA: free plus torch's cached blocks; CPU: the
    kernel's MemAvailable), or None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None


def _size(n: float) -> str:
    """A byte count for people: 5.4 kB, 12.3 MB, 4.1 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def check_row_space(b: int, s: int, dtype: torch.dtype, device: torch.device) -> None:
    """Before the Gram is built: refuse an m×m system (m = b·s) that cannot fit on `device`, with
    the numbers and the ways out; warn once per size when it fits but m is large."""
    m = b * s
    need = ROW_SPACE_MATRICES * m * m * torch.finfo(dtype).bits // 8
    ways_out = (
        "use a smaller batch or fewer outputs per sample, curvature='mc' (b·mc_samples rows, e.g. for per-token "
        "losses), or egn_fast.SGN (conjugate gradients, no m×m matrix)"
    )
    have = available_memory(device)
    if have is not None and need > have:
        raise ValueError(
            f"the row-space system has m = {m} rows (batch {b} × {s} per sample): its {m}×{m} {dtype} Gram and "
            f"Cholesky need about {_size(need)}, {_size(have)} is available on {device}; {ways_out}"
        )
    if m > LARGE_ROW_SPACE:
        warnings.warn(
            f"egn_fast: m = {m} rows (batch {b} × {s} per sample): each step builds a {m}×{m} Gram "
            f"({_size(need)} with its factor) and factors it (m³/3 ≈ {m**3 / 3:.1e} flops); if that is too slow, {ways_out}",
            RuntimeWarning,
            stacklevel=3,  # the caller of build_system
        )


def trainable(groups: list[dict[str, Any]]) -> list[nn.Parameter]:
    """The parameters of torch param groups that require grad, in group order."""
    return [p for g in groups for p in g["params"] if p.requires_grad]


def group_of(groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """id(parameter) → its param group. Directions come in model.parameters() order, which the
    groups need not follow, so per-group settings are looked up by identity."""
    return {id(p): g for g in groups for p in g["params"]}
