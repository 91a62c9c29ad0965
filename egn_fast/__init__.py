"""egn_fast: Exact Gauss-Newton (EGN) for PyTorch, in the row space, without materializing J.

    opt = egn_fast.EGN(model, loss="cross_entropy", lr=1.0, damping=1.0)
    info = opt.step(inputs, targets)

    d = egn_fast.direction(model, inputs, targets, loss="mse", damping=1.0)

returns d = −(H + λI)⁻¹g with H = (1/b)JᵀQJ and g = (1/b)Jᵀr for the batch-mean loss, computed
as d = −J̃ᵀ(K + bλI)⁻¹w with K = J̃J̃ᵀ formed from per-layer activations and output-gradients.

    opt = egn_fast.SGN(model, loss="cross_entropy", damping=1.0, cg_iters=10)

is the conjugate-gradient baseline (SGN): d ≈ −(H + λI)⁻¹g by CG on matrix-free products
Hv = (1/b)J̃ᵀ(J̃v), with J̃v from `row_jvp`.
"""

from . import ops
from .cpu import reuse_cpu_memory
from .direction import (
    DirectionResult,
    NonFiniteError,
    RowSpaceSystem,
    Solution,
    build_system,
    direction,
    direction_with_info,
    row_jvp,
)
from .losses import AutogradLoss, BCEWithLogitsLoss, CrossEntropyLoss, Loss, LossHead, MSELoss
from .optim import EGN, AdaptiveDamping, ArmijoLineSearch, EGNPreconditioner, StepInfo
from .sgn import SGN, SGNInfo
from .solve import EigenSolver, SolveError, damped_solve

__version__ = "0.1.0"

__all__ = [
    "EGN",
    "EGNPreconditioner",
    "StepInfo",
    "ArmijoLineSearch",
    "AdaptiveDamping",
    "SGN",
    "SGNInfo",
    "NonFiniteError",
    "direction",
    "direction_with_info",
    "build_system",
    "row_jvp",
    "RowSpaceSystem",
    "Solution",
    "DirectionResult",
    "Loss",
    "LossHead",
    "MSELoss",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "AutogradLoss",
    "EigenSolver",
    "SolveError",
    "damped_solve",
    "ops",
    "reuse_cpu_memory",
]
