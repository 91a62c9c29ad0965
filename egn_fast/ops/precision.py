"""The TF32 rule both GPU backends follow: an fp32 Gram may round its inputs to TF32 exactly when
torch's own CUDA fp32 matmuls may.

torch has two APIs for that switch. The legacy `torch.backends.cuda.matmul.allow_tf32` (a bool)
and, since torch 2.9, `torch.backends.cuda.matmul.fp32_precision` ("ieee" | "tf32" | "none",
where "none" inherits `torch.backends.fp32_precision`). Setting the legacy flag also sets the new
one, but once a user has set the new one, *reading* the legacy flag raises RuntimeError ("mix of
the legacy and new APIs"). So the new API is read whenever it exists.
"""

from __future__ import annotations

import torch

__all__ = ["tf32_allowed"]


def tf32_allowed() -> bool:
    """Whether torch's CUDA fp32 matmuls may round to TF32, whichever API set it."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        precision = matmul.fp32_precision
        if precision == "none":  # inherits the global setting
            precision = torch.backends.fp32_precision
        return precision == "tf32"
    return bool(matmul.allow_tf32)
