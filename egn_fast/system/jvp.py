"""J̃v, the other product of the rows (docs/design.md §3): for matrix-free methods that need
Hv = (1/b)J̃ᵀ(J̃v) (SGN's conjugate gradients) and for sᵀHs where the layer factors cannot give it.
J̃ᵀu is the system's back-projection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ..capture import Closure, running_eager
from ..dtensors import is_dtensor

if TYPE_CHECKING:
    from .row_space import RowSpaceSystem

__all__ = ["row_jvp", "row_jvp_fn"]


def row_jvp_fn(system: RowSpaceSystem, forward: Closure) -> Callable[[list[Tensor]], Tensor]:
    """Linearize the model once at the current parameters; return v ↦ J̃v (see `row_jvp`).

    Runs `forward` once and one reverse pass with create_graph=True; each call of the returned
    function is then one more reverse pass (through the first one), so an iterative method pays
    the forward only once. The graph is kept alive by the returned function: drop it when done.
    The parameters must not change while it is in use.
    """
    if any(is_dtensor(p) for p in system.params):
        raise ValueError(
            "row JVPs differentiate through the parameters, and FSDP computes with unsharded copies of sharded "
            "ones: with sharded parameters J̃v comes from the layer factors (every built-in rule has project)"
        )
    # callers are usually optimizer steps under no_grad; compiled code cannot be differentiated twice
    with torch.enable_grad(), running_eager():
        out, _ = forward()
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != system.b:
            raise ValueError(f"forward() must return outputs of batch size {system.b}, as when the system was built")
        f = out.reshape(out.shape[0], -1)
        if f.shape[1] != system.head.S.shape[1]:
            raise ValueError(f"forward() returned {f.shape[1]} outputs per sample; the system has {system.head.S.shape[1]}")
        # Jᵀu is linear in u, so ∂/∂u ⟨Jᵀu, v⟩ = Jv at any u: u = 0 is as good as any and keeps
        # the values out of the graph. Unused parameters get None (their columns of J are 0).
        u = torch.zeros_like(f, requires_grad=True)
        JTu = torch.autograd.grad(f, system.params, u, create_graph=True, allow_unused=True)
    S = system.head.S  # (b, c, s)

    def jvp(steps: list[Tensor]) -> Tensor:
        if len(steps) != len(system.params):
            raise ValueError(f"expected {len(system.params)} tensors shaped like system.params, got {len(steps)}")
        with torch.enable_grad():
            inner = sum(((g * v).sum() for g, v in zip(JTu, steps) if g is not None and g.requires_grad), f.new_zeros(()))
            # retain_graph: the graph of JᵀU is reused by every call
            (Jv,) = torch.autograd.grad(inner, u, retain_graph=True, allow_unused=True) if inner.requires_grad else (None,)
        if Jv is None:  # no trainable parameter reaches the outputs through a u-dependent path
            Jv = torch.zeros_like(f)
        return torch.einsum("bcs,bc->bs", S.to(Jv.dtype), Jv.detach())

    return jvp


def row_jvp(system: RowSpaceSystem, forward: Closure, steps: list[Tensor]) -> Tensor:
    """J̃v: the rows of `system` applied to a parameter-space vector v, at the current parameters.

    system: from `build_system` (gram=False is enough); forward: `closure() -> (outputs,
    targets)` that runs the model on the same batch (e.g. `forward_of(model, inputs, targets,
    None)`); steps: v, one tensor per parameter of `system.params`, with its shape.
    Returns (b, s): entry (i, k) = S_{i,:,k}ᵀ (J v)_i, so ‖J̃v‖²/b = vᵀHv and
    (1/b)J̃ᵀ(J̃v) = Hv (J̃ᵀu is `system.backproject(-u.reshape(-1))`). Dtype of the outputs.

    J v is computed as ∂/∂u ⟨Jᵀu, v⟩ with two reverse passes, so it works for any model the
    closure can run (no forward-mode support needed). For many products at one point use
    `row_jvp_fn`, which runs the forward once.
    """
    return row_jvp_fn(system, forward)(steps)
