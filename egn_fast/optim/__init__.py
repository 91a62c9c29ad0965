"""The optimizers (docs/design.md §3): they only orchestrate the stages before them.

| file                 | what it owns                                                                |
|----------------------|-----------------------------------------------------------------------------|
| egn.py               | `EGN`, the update rule in its docstring; the state between steps             |
| functional.py        | the EGN step as plain functions: direction, steps, LM model, acceptance      |
| momentum.py          | momentum on the direction ("ema", "heavy_ball", "nesterov")                  |
| line_search.py       | `ArmijoLineSearch` and its backtracking loop                                 |
| damping.py           | `AdaptiveDamping` and the gain ratio                                         |
| step_info.py         | `StepInfo`, what one step did                                                |
| model_optimizer.py   | `ModelOptimizer`, what EGN and SGN share as torch optimizers bound to a model |
| preconditioner.py    | `EGNPreconditioner`: −d into .grad for any torch optimizer                   |
| sgn.py               | `SGN`: conjugate gradients on matrix-free Gauss-Newton products (baseline)   |
"""

from .damping import AdaptiveDamping
from .egn import EGN
from .line_search import ArmijoLineSearch
from .preconditioner import EGNPreconditioner
from .sgn import SGN, SGNInfo
from .step_info import StepInfo

__all__ = ["EGN", "EGNPreconditioner", "SGN", "SGNInfo", "StepInfo", "ArmijoLineSearch", "AdaptiveDamping"]
