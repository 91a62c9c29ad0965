"""The rules applied to a capture: every planned module's factors (docs/design.md §2)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

from torch.nn.utils import parametrize

from ..capture.compiled import running_eager
from ..dtensors import fsdp_hooks_off
from ..ops import Backend
from .factors import Factors, merge_shared
from .generic import generic_factors
from .parametrized import reevaluated_parametrizations
from .registry import RuleContext

if TYPE_CHECKING:
    from ..capture import ModelCapture

__all__ = ["layer_factors"]


def layer_factors(captured: ModelCapture, ctx: RuleContext, ops: Backend) -> list[Factors]:
    """Every planned module's factors from its captured calls (after `captured.backward`), with
    layers that share a parameter merged; then the calls are released. ctx: the context of
    every rule, less the module's name. Parametrizations are re-evaluated in eval mode meanwhile
    (egn_fast.rules.parametrized). Call under torch.no_grad(). Compiled modules re-run eagerly
    (egn_fast.capture.compiled), as in the capture, and without FSDP's forward hooks (egn_fast.dtensors)."""
    plan, calls = captured.plan, captured.calls
    factors: list[Factors] = []
    # only a module that is parametrized or has submodules can hold a parametrization (most hold none)
    parametrized = any(parametrize.is_parametrized(m) or next(m.children(), None) is not None for m in plan.modules())
    with running_eager(), fsdp_hooks_off(plan.modules()), reevaluated_parametrizations(plan.named_modules(), calls) if parametrized else nullcontext():
        for name, m, rule in plan.specific:
            f = rule(m, calls[m], replace(ctx, name=name))
            if f is not None:
                stray = [p for p in f.params if id(p) not in ctx.trainable_ids]
                if stray:
                    raise ValueError(
                        f"the rule {getattr(rule, '__name__', rule)!r} for module {name!r} returned factors for "
                        f"{len(stray)} parameter(s) J is not taken with respect to; a rule must use ctx.trainable(p)"
                    )
                factors.append(f)
        for name, m, ps in plan.generic:
            f = generic_factors(m, calls[m], replace(ctx, name=name), ps, plan.in_dims[m])
            if f is not None:
                factors.append(f)
    calls.clear()
    return merge_shared(factors, ops, ctx.dtype)
