"""The rule for nn.PReLU: z = max(0, x) + a·min(0, x) is affine in the slope a with coefficient
min(0, x), independent of a, so the per-sample rows Σ G∘min(0, x) (summed over every position
and, for one shared slope, every channel) come in closed form, like a normalization's weight."""

from __future__ import annotations

from torch import nn

from ..capture.hooks import ModuleCall
from .factors import PerSampleFactors
from .norms import norm_factors
from .registry import RuleContext, register_rule

__all__ = ["prelu_factors"]


@register_rule(nn.PReLU)
def prelu_factors(module: nn.PReLU, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """x (b, C, *spatial) or (b, C), slope a (1,) or (C,) over channel dim 1: rows P (b, s, *a.shape)."""
    return norm_factors(module, calls, ctx, lambda x: x.clamp(max=0), 1)
