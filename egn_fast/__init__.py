"""egn_fast: Exact Gauss-Newton (EGN) for PyTorch, in the row space, without materializing J.

    opt = egn_fast.EGN(model, loss="cross_entropy", lr=1.0, damping=1.0)
    info = opt.step(inputs, targets)

    d = egn_fast.direction(model, inputs, targets, loss="mse", damping=1.0)

returns d = −(H + λI)⁻¹g with H = (1/b)JᵀQJ and g = (1/b)Jᵀr for the batch-mean loss, computed
as d = −J̃ᵀ(K + bλI)⁻¹w with K = J̃J̃ᵀ formed from per-layer activations and output-gradients.

    opt = egn_fast.SGN(model, loss="cross_entropy", damping=1.0, cg_iters=10)

is the conjugate-gradient baseline (SGN): d ≈ −(H + λI)⁻¹g by CG on matrix-free products
Hv = (1/b)J̃ᵀ(J̃v), with J̃v from `row_jvp`.

    @egn_fast.register_rule(MyModule)
    def my_rule(module, calls, ctx): ...      # -> a Factors object (egn_fast.rules)

adds (or overrides) the layer rule for a module type. The architecture: docs/design.md; the
subpackages follow the data flow, stage by stage:

    capture/  →  losses/  →  rules/ (+ ops/)  →  system/  →  optim/      (distributed/, cli/ beside)
"""

from . import ops, rules
from .capture import ModuleCall, forward_of
from .cpu import reuse_cpu_memory
from .errors import NonFiniteError, SolveError
from .losses import AutogradLoss, BCEWithLogitsLoss, CrossEntropyLoss, Loss, LossHead, MSELoss, resolve_loss
from .optim import EGN, SGN, AdaptiveDamping, ArmijoLineSearch, EGNPreconditioner, SGNInfo, StepInfo
from .rules import (
    EmbeddingFactors,
    Factors,
    PerSampleFactors,
    RuleContext,
    SeqFactors,
    register_rule,
    unregister_rule,
)
from .system import (
    DirectionResult,
    EigenSolver,
    RowSpaceSystem,
    Solution,
    build_system,
    damped_solve,
    direction,
    direction_with_info,
    row_jvp,
)

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
    "SolveError",
    "direction",
    "direction_with_info",
    "build_system",
    "forward_of",
    "row_jvp",
    "RowSpaceSystem",
    "Solution",
    "DirectionResult",
    "register_rule",
    "unregister_rule",
    "RuleContext",
    "ModuleCall",
    "Factors",
    "SeqFactors",
    "EmbeddingFactors",
    "PerSampleFactors",
    "Loss",
    "LossHead",
    "MSELoss",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "AutogradLoss",
    "resolve_loss",
    "EigenSolver",
    "damped_solve",
    "ops",
    "rules",
    "reuse_cpu_memory",
]
