"""The generic rule: per-sample gradients by torch.func, for any module no specific rule covers
(custom modules, parameters used functionally by a parent module, subclasses that override a
registered forward). Exact for any per-sample computation, but it stores m·n numbers for the
module's n parameters and re-runs the module's forward per sample (vmapped)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import ModuleCall
from .factors import PerSampleFactors
from .registry import RuleContext

__all__ = ["generic_factors"]


def generic_factors(
    module: nn.Module,
    calls: list[ModuleCall],
    ctx: RuleContext,
    params: dict[str, nn.Parameter],
) -> PerSampleFactors | None:
    """Per-sample gradients of `module`'s outputs w.r.t. `params` (names relative to `module`),
    contracted with the recorded output-gradients: P_ik = Σ_calls ∂(G_ik · z_i)/∂θ, by torch.func
    (vjp per sample, vmapped over the batch and the s cotangents). Other parameters are constants."""
    b, s = ctx.b, ctx.s
    theta = {n: p.detach() for n, p in params.items()}
    total: dict[str, Tensor] = {}
    for call in calls:
        if not any(g is not None for g in call.grads):
            continue
        cot = tuple(
            g if g is not None else torch.zeros(b, s, *z.shape[1:], dtype=z.dtype, device=z.device)
            for g, z in zip(call.grads, call.outputs)
        )
        leaves, spec = tree_flatten((call.args, call.kwargs))
        leaves = [x.detach() if isinstance(x, Tensor) else x for x in leaves]
        batched = [q for q, x in enumerate(leaves) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == b]
        index = call.output_index

        def one_sample(batched_i: tuple, cot_i: tuple) -> dict:
            leaves_i = list(leaves)
            for q, x in zip(batched, batched_i):
                leaves_i[q] = x.unsqueeze(0)
            args_i, kwargs_i = tree_unflatten(leaves_i, spec)

            def outputs(th: dict) -> tuple:
                out = tree_flatten(torch.func.functional_call(module, th, args_i, kwargs_i))[0]
                return tuple(out[q].squeeze(0) for q in index)

            _, vjp_fn = torch.func.vjp(outputs, theta)
            return torch.func.vmap(vjp_fn)(cot_i)[0]

        try:
            grads = torch.func.vmap(one_sample)(tuple(leaves[q] for q in batched), cot)
        except RuntimeError as err:
            if "random" in str(err).lower():
                raise RuntimeError(
                    f"module {ctx.name!r} ({type(module).__name__}) is handled by per-sample gradients "
                    "(torch.func) and draws random numbers in forward (dropout?): put the model "
                    "in eval mode or remove the randomness"
                ) from err
            raise
        for n, g in grads.items():
            total[n] = total[n] + g if n in total else g
    if not total:
        return None
    return PerSampleFactors([params[n] for n in total], list(total.values()))
