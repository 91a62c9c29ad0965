"""The loss stage (docs/design.md §1, §1.1): at the model's outputs, the per-sample losses ℓ, the
residuals r, the curvature factor S (S_i S_iᵀ = Q_i, or an estimate of it) and the right-hand side
w (S_i w_i = r_i), the rows the batched backward pushes through the model.

| file              | what it owns                                                                     |
|-------------------|----------------------------------------------------------------------------------|
| heads.py          | `Loss`, `LossHead`; mse, bce, `AutogradLoss` (any per-sample callable), `ScaledLoss` |
| cross_entropy.py  | cross-entropy per sample and per token (ignore_index, the token mean)             |
| curvature.py      | the row estimators "exact", "mc", "empirical": `rows_for`                         |
| resolve.py        | what `loss=` accepts: `resolve_loss`, `NAMED_LOSSES`, torch's loss modules        |
| share.py          | `BatchShare` (a rank's part of a global batch), `draw` (split-invariant draws)    |
"""

from .cross_entropy import CrossEntropyLoss
from .curvature import CURVATURES, Rows, check_curvature, rows_for
from .heads import AutogradLoss, BCEWithLogitsLoss, Loss, LossHead, MSELoss, ScaledLoss
from .resolve import NAMED_LOSSES, LossSpec, from_torch_loss, resolve_loss
from .share import BatchShare, draw

__all__ = [
    "Loss", "LossHead", "MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss", "AutogradLoss", "ScaledLoss",
    "LossSpec", "NAMED_LOSSES", "resolve_loss", "from_torch_loss", "CURVATURES", "Rows", "check_curvature",
    "rows_for", "BatchShare", "draw",
]
