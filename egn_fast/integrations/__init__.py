"""EGN in the training frameworks people use (README "Integrations"):

| name / file | what it is                                                                               |
|-------------|------------------------------------------------------------------------------------------|
| EGNTrainer  | trainer.py: a `transformers.Trainer` whose training step is one EGN step on the batch      |
| targets.py  | EGN's loss and (outputs, targets) for a Hugging Face causal LM, sequence or token classifier |

Lightning (manual optimization, `opt.step(closure=...)`) and Accelerate (`accelerator.prepare`)
need no code here: their recipes are examples/lightning_egn.py and examples/accelerate_egn.py.
transformers is imported on first use of `EGNTrainer`, never by `import egn_fast`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EGNTrainer"]


def __getattr__(name: str) -> Any:
    if name == "EGNTrainer":  # lazily: importing the package must not need transformers
        from .trainer import EGNTrainer

        return EGNTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
