"""Modules with torch.nn.utils.parametrize parametrizations (weight_norm, spectral_norm,
orthogonal, register_parametrization): the trainable parameters are the parametrizations'
`original`/`original0`/… (and any parameters of the parametrization modules), and the module's
weight W = P(original) is computed in every forward.

The module's own rule gives per-sample rows for the computed W (b, s, *W.shape); the rows of the
originals are their vector-Jacobian products through P, vmapped over the m rows:

    P_original[i, k] = (∂W/∂original)ᵀ P_W[i, k].

While the rules run, P is re-evaluated with its modules in eval mode
(`reevaluated_parametrizations`), so spectral_norm does not run its power iteration again (the
user's forward already updated its u/v buffers, and W used the updated ones); every W the
forward recorded is checked to be reproduced that way, else the call is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..capture.hooks import ModuleCall
from ..ops import get_backend
from .factors import PerSampleFactors
from .registry import Rule, RuleContext, rule_for

__all__ = ["planned_rule", "parametrization_modules", "parametrizations_in_eval", "reevaluated_parametrizations"]

_REPRODUCE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def planned_rule(module: nn.Module, trainable: set[int]) -> tuple[Rule | None, list[nn.Parameter]]:
    """The rule the plan uses for a called module, and the trainable parameters it covers: the
    registered rule and the module's own parameters, or, for a module with a rule and trainable
    parametrizations, that rule chained through them, covering the parametrizations' parameters too.
    (A parametrized module without a rule is left to the generic rule, which calls the module
    with its originals: torch.func.functional_call applies the parametrization.)"""
    own = [p for p in module.parameters(recurse=False) if id(p) in trainable]
    rule = rule_for(module)
    if not parametrize.is_parametrized(module):
        return rule, own
    inside = [p for p in module.parametrizations.parameters() if id(p) in trainable]
    if rule is None or not inside:  # without a rule, the generic one differentiates through P itself
        return rule, own
    return _chained(rule), own + inside


def parametrization_modules(model: nn.Module) -> set[nn.Module]:
    """The ParametrizationLists in `model` and every module inside them. They never host the
    generic rule: their output W is shared by the batch; the parametrized module they belong to
    (or the module calling it) is differentiated through them instead."""
    return {m for pl in model.modules() if isinstance(pl, parametrize.ParametrizationList) for m in pl.modules()}


@contextmanager
def parametrizations_in_eval(modules: list[nn.Module]) -> Iterator[None]:
    """Every parametrization inside `modules` in eval mode while egn_fast re-evaluates them, so
    W = P(original) does not update buffers again (spectral_norm's power iteration already ran in
    the forward, and W used the updated u, v); the modes are restored on exit."""
    modes = {m: m.training for top in modules for pl in top.modules() if isinstance(pl, parametrize.ParametrizationList)
             for m in pl.modules()}
    try:
        for m in modes:
            m.training = False
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def reevaluated_parametrizations(modules: list[tuple[str, nn.Module]], calls: dict[nn.Module, list[ModuleCall]]) -> Iterator[None]:
    """While the rules run: `parametrizations_in_eval` for `modules` (qualified name, module),
    after checking that this reproduces the W every recorded ParametrizationList call returned."""
    with parametrizations_in_eval([m for _, m in modules]):
        for top_name, top in modules:
            for name, plist in top.named_modules():
                if isinstance(plist, parametrize.ParametrizationList):
                    _check_reproduces(f"{top_name}.{name}".lstrip("."), plist, calls.get(plist, []))
        yield


def _chained(rule: Rule) -> Rule:
    def parametrized_factors(module: nn.Module, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
        """Rows (b, s, *p.shape) for the module's own trainable parameters and its parametrizations'."""
        plists = {n: pl for n, pl in module.parametrizations.items() if any(ctx.trainable(p) is not None for p in pl.parameters())}
        with parametrize.cached():  # in eval mode (reevaluated_parametrizations)
            computed = {n: getattr(module, n) for n in plists}  # W = P(original), once; cached for the rule
            inner = rule(module, calls, replace(ctx, trainable_ids=ctx.trainable_ids | {id(W) for W in computed.values()}))
            if inner is None:
                return None
            backend = get_backend("torch", computed[next(iter(plists))].device)
            rows = dict(zip(map(id, inner.params), inner.per_sample_grads(backend, ctx.dtype)))
            computed_ids = {id(W) for W in computed.values()}
            params = [p for p in inner.params if id(p) not in computed_ids]
            P = [rows[id(p)] for p in params]
            for n, plist in plists.items():
                theta = {k: p.detach() for k, p in plist.named_parameters() if ctx.trainable(p) is not None}
                W_rows = rows[id(computed[n])]  # (b, s, *W.shape)
                _, vjp_fn = torch.func.vjp(lambda th: torch.func.functional_call(plist, th, ()), theta)
                chained = torch.func.vmap(vjp_fn)(W_rows.flatten(0, 1).to(computed[n].dtype))[0]
                named = dict(plist.named_parameters())
                for k, g in chained.items():
                    params.append(named[k])
                    P.append(g.view(ctx.b, ctx.s, *g.shape[1:]).to(ctx.dtype))
        return PerSampleFactors(params, P)

    parametrized_factors.__name__ = f"parametrized_{getattr(rule, '__name__', 'rule')}"
    return parametrized_factors


def _check_reproduces(name: str, plist: parametrize.ParametrizationList, calls: list[ModuleCall]) -> None:
    """ValueError unless the parametrization, in eval mode, gives the W its recorded calls returned."""
    if not calls:  # not hooked: its parameters are held fixed
        return
    W = plist()
    for call in calls:
        recorded = call.outputs[0].detach()
        tol = _REPRODUCE_TOL.get(W.dtype, 1e-2)
        if not torch.allclose(W, recorded, rtol=tol, atol=tol):
            raise ValueError(
                f"the parametrization {name!r} ({type(plist[0]).__name__}), re-evaluated in eval mode, does not reproduce "
                "the weight of the forward (does it behave differently in train mode?); egn_fast cannot chain through it"
            )
