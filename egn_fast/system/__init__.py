"""The row-space system (docs/design.md §1, §3): from a capture and its loss rows to the Gram
K = J̃J̃ᵀ, the damped solve (K + bλI)γ = w and the back-projection d = −J̃ᵀγ.

| file          | what it owns                                                                         |
|---------------|--------------------------------------------------------------------------------------|
| build.py      | `build_system`: capture → loss rows → [gradient] → batched backward → factors → Gram |
| row_space.py  | `RowSpaceSystem`, `WoodburySystem` (Monte-Carlo rows), `Solution`, J̃v from factors   |
| solve.py      | damped Cholesky with jitter retry, `EigenSolver`, conjugate gradients, `dot`        |
| metric.py     | the diagonal metric d = −(H + λD)⁻¹g by a change of variables, Adam's D            |
| jvp.py        | `row_jvp`, `row_jvp_fn`: J̃v by two reverse passes through the model                |
| direction.py  | `direction`, `direction_with_info`: build_system + solve_and_backproject            |
"""

from .build import build_system
from .direction import DirectionResult, direction, direction_with_info
from .jvp import row_jvp, row_jvp_fn
from .row_space import RowSpaceSystem, Solution, WoodburySystem
from .solve import EigenSolver, damped_solve

__all__ = [
    "build_system", "RowSpaceSystem", "WoodburySystem", "Solution", "EigenSolver", "damped_solve", "row_jvp",
    "row_jvp_fn", "direction", "direction_with_info", "DirectionResult",
]
