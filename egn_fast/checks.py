"""Argument checks shared by every stage and entry point (`direction`/`build_system`, `EGN`, `SGN`,
`EGNPreconditioner`): one definition of what a valid damping, lr, model, parameter list, model
output and row-space size is, and one wording of the error for each. (Which losses are accepted
is egn_fast.losses.resolve.)"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn

__all__ = [
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

SEQ_METHODS = ("auto", "ghost", "per_sample")


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


def all_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite. One sum read as a Python float first (an element-wise
    check and its reduction cost several ops a step); a sum of finite entries is finite unless it
    overflows, which the element-wise check then settles."""
    x = x.detach()
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def per_sample_outputs(out: Any) -> Tensor:
    """The model's output (b, …) flattened to (b, c), or a ValueError saying what is wrong with it."""
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor (b, …), got {type(out).__name__}")
    if out.dim() == 0:
        raise ValueError("the model returned a scalar; egn_fast needs per-sample outputs (b, …)")
    if out.shape[0] == 0:
        raise ValueError(f"the batch is empty (outputs of shape {tuple(out.shape)}); pass at least one sample")
    if math.prod(out.shape[1:]) == 0:
        raise ValueError(f"the model's outputs {tuple(out.shape)} hold no values per sample")
    return out.reshape(out.shape[0], -1)


# Beyond this many rows a step that fits in memory still factors an m×m matrix (m³/3 flops): warn.
LARGE_ROW_SPACE = 10_000
ROW_SPACE_MATRICES = 3  # peak m×m matrices of a step: K, K + bλI, its Cholesky factor
# Systems that need less than this many bytes are not checked against the free memory: reading it
# costs a file read (CPU) or a driver call (CUDA) per step, and 64 MiB that do not fit would fail
# the step's other allocations as well.
MEMORY_CHECKED_FROM = 1 << 26


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
    the numbers and the ways out (systems under MEMORY_CHECKED_FROM bytes are not checked); warn
    once per size when it fits but m is large."""
    m = b * s
    need = ROW_SPACE_MATRICES * m * m * torch.finfo(dtype).bits // 8
    if need < MEMORY_CHECKED_FROM and m <= LARGE_ROW_SPACE:
        return
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
