"""Rules for the affine normalizations LayerNorm, RMSNorm, GroupNorm and BatchNorm in eval mode:
z = x̂ ∘ weight + bias, where x̂ (the normalized input) does not depend on the parameters, so the
per-sample gradient rows Σ G∘x̂ and Σ G are small (size of weight) and built directly."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture.hooks import ModuleCall
from .factors import PerSampleFactors
from .registry import RuleContext, first_input, register_rule, used_calls

__all__ = ["norm_factors", "layernorm_factors", "rmsnorm_factors", "groupnorm_factors", "batchnorm_factors"]


def norm_factors(
    module: nn.Module, calls: list[ModuleCall], ctx: RuleContext, normalize: Callable[[Tensor], Tensor], channel_dim: int
) -> PerSampleFactors | None:
    """Per-sample rows P_weight (b, s, *weight.shape) = Σ G∘x̂ and P_bias = Σ G.

    channel_dim: 1 for GroupNorm/BatchNorm (weight per channel of (b, C, *spatial)), -1 for
    LayerNorm/RMSNorm (weight over the trailing normalized_shape of (b, *rest, *normalized)).
    """
    weight, bias = ctx.trainable(getattr(module, "weight", None)), ctx.trainable(getattr(module, "bias", None))
    used = used_calls(calls)
    if not used or (weight is None and bias is None):
        return None
    shape = (weight if weight is not None else bias).shape
    n = shape.numel()

    def channel_major(t: Tensor, lead: int) -> Tensor:  # (*lead dims, …) -> (*lead dims, n, L)
        if channel_dim == 1:
            return t.reshape(*t.shape[:lead], n, -1)
        return t.reshape(*t.shape[:lead], -1, n).transpose(-1, -2)

    Pw = Pb = 0
    for call, G in used:
        x = first_input(call, ctx, position_wise=channel_dim == -1)
        Gc = channel_major(G.to(ctx.dtype), 2)  # (b, s, n, L)
        if weight is not None:
            Pw = Pw + torch.einsum("bsnl,bnl->bsn", Gc, channel_major(normalize(x).to(ctx.dtype), 1))
        if bias is not None:
            Pb = Pb + Gc.sum(3)
    params = [p for p in (weight, bias) if p is not None]
    P = [q.view(ctx.b, ctx.s, *shape) for q, p in ((Pw, weight), (Pb, bias)) if p is not None]
    return PerSampleFactors(params, P)


@register_rule(nn.LayerNorm)
def layernorm_factors(module: nn.LayerNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    return norm_factors(module, calls, ctx, lambda x: F.layer_norm(x, module.normalized_shape, eps=module.eps), -1)


@register_rule(nn.RMSNorm)
def rmsnorm_factors(module: nn.RMSNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    return norm_factors(module, calls, ctx, lambda x: F.rms_norm(x, module.normalized_shape, eps=module.eps), -1)


@register_rule(nn.GroupNorm)
def groupnorm_factors(module: nn.GroupNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    return norm_factors(module, calls, ctx, lambda x: F.group_norm(x, module.num_groups, eps=module.eps), 1)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_factors(module: nn.modules.batchnorm._BatchNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """Eval mode only (the plan refuses batch statistics, which mix samples)."""

    def normalize(x: Tensor) -> Tensor:  # running statistics: no mixing across samples
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - module.running_mean.view(view)) * torch.rsqrt(module.running_var.view(view) + module.eps)

    return norm_factors(module, calls, ctx, normalize, 1)
