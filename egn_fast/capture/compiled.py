"""Compiled models (docs/design.md §3, "Compiled models"): the capture runs them eagerly.

`torch.compile(model)` returns an `OptimizedModule` wrapping the model (`_orig_mod`);
`module.compile()` makes `module.__call__` run a compiled `_call_impl`. Compiled code does not
run our forward hooks as eager code does (inductor reuses buffers in place, so the recorded
tensors change after recording), and its backward cannot be batched or differentiated twice. So
every forward egn_fast runs for a capture (the hooked forward, its re-runs, the probe, the
generic rule's torch.func re-runs, the linearization of `row_jvp`) runs under
`torch.compiler.set_stance("force_eager")`: each compiled module runs its original forward,
with the same parameters, so the rows are those of the eager model. The optimizers' other
forwards (line-search losses) still run the compiled code.
"""

from __future__ import annotations

import contextlib
import sys
from typing import ContextManager

from torch import nn

__all__ = ["uncompiled", "running_eager"]


def _compiling_loaded() -> bool:
    # torch.compile imports torch._dynamo: without it no module can be compiled, and importing
    # it only to switch it off would cost a process that never compiles about 2 s.
    return "torch._dynamo" in sys.modules


def uncompiled(model: nn.Module) -> nn.Module:
    """The module `torch.compile(model)` wraps (unwrapped repeatedly), else `model` itself: its
    parameters are the same tensors, named as in the user's model (no "_orig_mod." prefix), and
    plans are cached on it whether it is called compiled or not."""
    if not _compiling_loaded():
        return model
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def running_eager() -> ContextManager[None]:
    """Within the block every compiled function and module runs its original eager code."""
    if not _compiling_loaded():
        return contextlib.nullcontext()
    import torch

    return torch.compiler.set_stance("force_eager")
