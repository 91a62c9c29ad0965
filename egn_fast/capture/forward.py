"""The forward stage: run the model once with hooks, plan the capture (plan.py), and run it again
only when the plan asks for it — tensors shared by all samples to expand (layout.py), recorded
tensors the model edits in place to copy. Whatever a forward changes besides its outputs
(buffers such as running statistics, the RNG state) is undone before a re-run and on any error,
so the user's forward takes effect exactly once per step.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..checks import all_finite, per_sample_outputs
from ..dtensors import fsdp_hooks_off, reshard_fsdp
from ..errors import NonFiniteError
from .hooks import Capture, Closure, ModuleCall
from .plan import OutputKey, Plan, mixing_error, module_names, plan_for

__all__ = ["ModelState", "undone_on_error", "capture_planned"]

# Per model: the batch size, the outputs that its last plan found shared (layout.py) and which of
# them are given per-row gradients instead of copies.
_SHARED: "weakref.WeakKeyDictionary[nn.Module, tuple[int, dict[OutputKey, tuple], frozenset[OutputKey]]]" = (
    weakref.WeakKeyDictionary()
)


class ModelState:
    """The model's buffers and the RNG state before a forward, to undo what a forward did
    (running statistics, power iterations, dropout draws) before it runs again or on an error:
    the user's forward changes them exactly once per step."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.buffers = [(buf, buf.clone()) for buf in model.buffers()]
        self.device = device
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def _check_outputs(f_flat: Tensor) -> None:
    if not all_finite(f_flat):
        raise NonFiniteError("the model's outputs contain non-finite values (nan/inf)")
    if not f_flat.requires_grad:
        raise ValueError("the model's outputs do not depend on any trainable parameter")


@contextmanager
def undone_on_error(model: nn.Module, device: torch.device) -> Iterator[ModelState]:
    """The model's state before the block; restored if the block raises."""
    state = ModelState(model, device)
    try:
        yield state
    except BaseException:
        state.restore()
        raise


def capture_planned(
    model: nn.Module,
    forward: Closure,
    hooked: list[nn.Module],
    trainable: set[int],
    state: ModelState,
    batch_size: int | None = None,
) -> tuple[Capture, Tensor, object, Plan]:
    """Run the captured forward and plan it: (capture, f_flat (b, c), targets, plan), the plan's
    layouts applied to the calls. batch_size: b when known before the forward (the targets'),
    else the last plan's is assumed for shared tensors and checked. `state` (taken before the
    first forward) is restored before every re-run, so the model's own forward takes effect once.

    A shared output that the model cannot take as b copies (it adds a batch dimension of its own,
    `x + pf(table)[None]`) is given per-row gradients instead (hooks.output_grads) when its call
    takes only the model's own parameters and buffers: then it is the same for every sample by
    construction, not a sign of samples mixing."""
    b_shared, expand, rowwise = _SHARED.get(model, (0, {}, frozenset()))
    b_shared = batch_size or b_shared  # which outputs are shared does not depend on b
    newest: dict[OutputKey, tuple] = {}  # the expansion this attempt tries for the first time
    own: set[OutputKey] = set()  # those of newest whose calls take only the model's own tensors
    reference: Tensor | None = None  # f before it, which the expansion must leave unchanged
    for attempt in range(5):
        if attempt:
            state.restore()
        try:
            with torch.enable_grad(), Capture(hooked, expand, b_shared, rowwise) as capture:
                out, targets = forward()
                # under the caller's no_grad (an optimizer step) a view made later would lose its grad_fn
                f_flat = per_sample_outputs(out)  # a tensor (b, …), b ≥ 1, flattened to (b, c)
        except Exception as err:
            if newest:  # the expansion broke the forward
                rowwise, newest = _rowwise_instead(model, newest, own, rowwise, err), {}
                continue
            if not expand:
                raise
            expand, rowwise = {}, frozenset()  # expansions made for another batch size broke the forward: plan afresh
            continue
        _check_outputs(f_flat)
        b = out.shape[0]
        if any(c.expanded for calls in capture.calls.values() for c in calls) and not newest:
            if b != b_shared or _target_batch(targets) not in (None, b):
                expand, rowwise = {}, frozenset()  # made for another batch size
                continue
        if newest and not _unchanged(reference, f_flat):  # the expansion changed the outputs
            rowwise, newest = _rowwise_instead(model, newest, own, rowwise), {}
            continue
        reshard_fsdp(model)  # the rules see the registered (sharded) parameters, egn_fast.dtensors
        with fsdp_hooks_off([model]):  # its trial re-runs run on full parameter values
            plan = plan_for(model, capture, f_flat, trainable)
        if plan.shared:
            if newest:  # already expanded once and still not per-sample
                raise mixing_error(module_names(model), next(iter(plan.shared)))
            reference, newest = f_flat.detach(), plan.shared
            model_tensors = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
            own = {key for key in newest if _takes_only(model_tensors, capture.calls[key[0]][key[1]])}
            expand, b_shared = {**expand, **plan.shared}, b
            continue
        newest = {}
        # A model that edits a recorded tensor in place (ReLU(inplace=True) after a layer, x += …)
        # would corrupt our factors: remember those modules and capture again with copies.
        if capture.stale_modules(plan.modules()):
            continue
        _SHARED[model] = (b, expand, rowwise)
        plan.apply(capture)
        capture.output_shape = tuple(out.shape)
        return capture, f_flat, targets, plan
    raise RuntimeError("the model's forward did not settle on one capture after 5 attempts (in-place edits?)")


def _takes_only(model_tensors: set[int], call: ModuleCall) -> bool:
    """Whether every tensor the call took is one of `model_tensors` (the ids of the model's
    parameters and buffers) or a view of one: its outputs are then the same for every sample by
    construction."""
    return bool(call.inputs) and all(
        id(x) in model_tensors or (x._base is not None and id(x._base) in model_tensors) for x in call.inputs
    )


def _rowwise_instead(
    model: nn.Module, newest: dict[OutputKey, tuple], own: set[OutputKey], rowwise: frozenset[OutputKey], err: Exception | None = None
) -> frozenset[OutputKey]:
    """Expanding `newest` broke the forward or changed its outputs: give them per-row gradients
    instead when their calls took only the model's own tensors (`own`), else refuse the model."""
    if newest.keys() <= own:
        return rowwise | newest.keys()
    raise mixing_error(module_names(model), next(iter(newest))) from err


def _target_batch(targets: object) -> int | None:
    return targets.shape[0] if isinstance(targets, Tensor) and targets.dim() else None


def _unchanged(reference: Tensor, f_flat: Tensor) -> bool:
    """Whether expanding shared outputs left the model's outputs as they were."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return reference.shape == f_flat.shape and torch.allclose(reference, f_flat.detach(), rtol=1e-5, atol=1e-6 * scale)
