"""The public one-call API: the exact Levenberg–Marquardt / EGN direction for one mini-batch.

    d = egn_fast.direction(model, inputs, targets, loss="mse", damping=1.0)
    info = egn_fast.direction_with_info(...)     # + loss, solve by-products, m, timings, samples
    d = egn_fast.direction(model, ids, targets, loss="cross_entropy", curvature="mc", mc_samples=1)

Both are `build_system` followed by `RowSpaceSystem.solve_and_backproject`, the same two calls
the optimizers make (with a process group, the data-parallel `build_system`, egn_fast.distributed).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Inputs
from ..checks import check_damping
from ..losses import LossSpec, check_curvature
from .build import build_system
from .row_space import Solution

__all__ = ["DirectionResult", "direction", "direction_with_info"]


@dataclass
class DirectionResult:
    """`direction_with_info`'s answer: the direction, the loss, the solve and its by-products;
    samples: the targets drawn for curvature="mc", (k, *targets.shape) (LongTensor (k, b, T) per
    token, (k, b) for (b, C) outputs), else None."""

    direction: list[Tensor]
    loss: float
    solution: Solution
    m: int
    timings: dict[str, float]
    samples: Tensor | None = None


def direction_with_info(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    loss: LossSpec = "mse",
    damping: float = 1.0,
    backend: str = "auto",
    solve_dtype: torch.dtype | None = None,
    seq_method: str = "auto",
    timings: bool = False,
    process_group: Any = None,
    distributed: str | None = None,
    curvature: str = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> DirectionResult:
    """The direction of `direction`, plus the loss, γ, jitter, gᵀd, dᵀHd, ‖d‖², the predicted
    decrease, (with timings=True) seconds per stage, and the drawn samples.

    inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments); the model's
    output is (b, …), flattened to (b, c); targets as the loss expects (egn_fast.losses).
    loss: "mse" | "cross_entropy" | "bce" | a `Loss` | torch's loss module | a per-sample callable.
    damping: λ ≥ 0. backend: op backend ("auto" | "torch" | "triton" | "cuda"); solve_dtype: the
    Cholesky's dtype (default the Gram's); seq_method: "auto" | "ghost" | "per_sample" for
    sequence layers.

    process_group: a torch.distributed group whose ranks each pass their own shard of the batch
    (egn_fast.distributed); distributed="exact" (the default with a group) returns on every rank
    the direction of the concatenated batch, "local" the mean of the per-rank directions. A model
    sharded with FSDP2's fully_shard runs over its mesh's ranks without a group, and each rank
    gets its own shard of the direction: DTensors placed like the parameters.

    curvature: "exact" (H itself) | "mc" (H estimated from `mc_samples` rows per sample with
    targets drawn from the model by `generator`; the step −(Ĥ + λI)⁻¹g is exact for those draws,
    λ > 0) | "empirical" (one row per sample from the true targets); see egn_fast.losses.curvature.
    Per-token cross-entropy: outputs (b, T, V), targets (b, T), −100 ignored.
    """
    # imported here, not above: egn_fast.distributed is built on this package's build_system
    from ..distributed import DataParallel, resolve_distributed

    damping = check_damping(damping)  # before the model runs
    check_curvature(curvature, mc_samples, generator, damping)
    process_group, mode = resolve_distributed(model, process_group, distributed)
    dp = None if mode is None else DataParallel(process_group, mode, _device(model))
    with contextlib.nullcontext() if dp is None else dp.named_failures():
        system = (build_system if dp is None else dp.build_system)(
            model, inputs, targets, loss=loss, backend=backend, seq_method=seq_method, timings=timings,
            curvature=curvature, mc_samples=mc_samples, generator=generator,
        )
        sol, d = system.solve_and_backproject(damping, solve_dtype)
    return DirectionResult(d, system.loss, sol, system.w.shape[0], system.timings, getattr(system, "samples", None))


def direction(model: nn.Module, inputs: Inputs, targets: Tensor, **options: Any) -> list[Tensor]:
    """The exact Levenberg–Marquardt / EGN direction d = −(H + λI)⁻¹g for one mini-batch.

    H = (1/b)JᵀQJ is the Gauss-Newton matrix and g = (1/b)Jᵀr the gradient of the batch-mean
    loss; λ = `damping`. Computed as d = −J̃ᵀ(K + bλI)⁻¹w in the m×m row space (m = b·s),
    from per-layer activations and output-gradients, never materializing J.

    Returns one tensor per trainable parameter, in model.parameters() order, with the
    parameter's shape, dtype and device: apply it as `p += lr * d`. The keyword arguments (loss,
    damping, backend, solve_dtype, seq_method, process_group, distributed, curvature,
    mc_samples, generator) are those of `direction_with_info`, which documents them.
    """
    return direction_with_info(model, inputs, targets, **options).direction


# One list of arguments, `direction_with_info`'s (less timings), shown by help() and inspect for both.
_signature = inspect.signature(direction_with_info)
direction.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p for name, p in _signature.parameters.items() if name != "timings"], return_annotation="list[Tensor]"
)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
