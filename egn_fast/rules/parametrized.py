"""Modules with torch.nn.utils.parametrize parametrizations (weight_norm, spectral_norm,
orthogonal, register_parametrization): the trainable parameters are the parametrizations'
`original`/`original0`/… (and any parameters of the parametrization modules), and the module's
weight W = P(original) is computed in every forward.

The module's own rule gives per-sample rows for the computed W (b, s, *W.shape); the rows of the
originals are their vector-Jacobian products through P, vmapped over the m rows:

    P_original[i, k] = (∂W/∂original)ᵀ P_W[i, k].

P is re-evaluated with its modules in eval mode, so spectral_norm does not run its power
iteration again (the user's forward already updated its u/v buffers, and W used the updated
ones); the rule checks that the module's recorded outputs are reproduced with that W.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..capture import ModuleCall
from ..ops import get_backend
from .factors import PerSampleFactors
from .registry import Rule, RuleContext, rule_for

__all__ = ["planned_rule"]

_REPRODUCE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def planned_rule(module: nn.Module, trainable: set[int]) -> tuple[Rule | None, list[nn.Parameter]]:
    """The rule the plan uses for a called module, and the trainable parameters it covers: the
    registered rule and the module's own parameters, or, for a module with trainable
    parametrizations, that rule chained through them, covering the parametrizations' parameters too."""
    own = [p for p in module.parameters(recurse=False) if id(p) in trainable]
    rule = rule_for(module)
    if not parametrize.is_parametrized(module):
        return rule, own
    inside = [p for p in module.parametrizations.parameters() if id(p) in trainable]
    if not inside:
        return rule, own
    if rule is None:
        raise ValueError(
            f"{type(module).__name__} is parametrized (torch.nn.utils.parametrize) but has no layer rule; "
            "egn_fast chains parametrizations through a module's rule: register one with egn_fast.register_rule"
        )
    return _chained(rule), own + inside


@contextmanager
def _parametrizations_in_eval(module: nn.Module) -> Iterator[None]:
    """The parametrization modules in eval mode (spectral_norm: no power iteration), restored after."""
    modes = [(m, m.training) for m in module.parametrizations.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, training in modes:
            m.training = training


def _chained(rule: Rule) -> Rule:
    def parametrized_factors(module: nn.Module, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
        """Rows (b, s, *p.shape) for the module's own trainable parameters and its parametrizations'."""
        plists = {n: pl for n, pl in module.parametrizations.items() if any(ctx.trainable(p) is not None for p in pl.parameters())}
        with _parametrizations_in_eval(module), parametrize.cached():
            computed = {n: getattr(module, n) for n in plists}  # W = P(original), once; cached for the rule
            _check_reproduces(module, calls, ctx)
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
                chained = torch.func.vmap(vjp_fn)(W_rows.flatten(0, 1))[0]
                named = dict(plist.named_parameters())
                for k, g in chained.items():
                    params.append(named[k])
                    P.append(g.view(ctx.b, ctx.s, *g.shape[1:]))
        return PerSampleFactors(params, P)

    parametrized_factors.__name__ = f"parametrized_{getattr(rule, '__name__', 'rule')}"
    return parametrized_factors


def _check_reproduces(module: nn.Module, calls: list[ModuleCall], ctx: RuleContext) -> None:
    """ValueError unless the module, with its parametrizations re-evaluated in eval mode, gives
    the outputs recorded in its first call that reaches the loss."""
    call = next((c for c in calls if any(g is not None for g in c.grads)), None)
    if call is None:
        return
    out = module(*call.args, **call.kwargs)
    z = call.outputs[0]
    recomputed = (out if isinstance(out, Tensor) else torch.utils._pytree.tree_flatten(out)[0][call.output_index[0]]).detach()
    tol = _REPRODUCE_TOL.get(z.dtype, 1e-2)
    if not torch.allclose(recomputed, z.detach(), rtol=tol, atol=tol):
        raise ValueError(
            f"module {ctx.name!r} ({type(module).__name__}): its parametrizations, re-evaluated in eval mode, do "
            "not reproduce the forward's weight (a parametrization that behaves differently in train mode?)"
        )
