"""The rule for nn.InstanceNorm1d/2d/3d with affine=True: each sample is normalized by its own
statistics (or, in eval mode with track_running_stats, by the running ones), so z = x̂ ∘ weight
+ bias per channel with x̂ free of the parameters: the normalizations' closed-form rows
(norms.py). Train mode with track_running_stats updates buffers: refused by the plan."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..capture.hooks import ModuleCall
from .factors import PerSampleFactors
from .norms import norm_factors
from .registry import RuleContext, register_rule

__all__ = ["instancenorm_factors"]


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instancenorm_factors(module: nn.modules.instancenorm._InstanceNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """x (b, C, *spatial), weight/bias (C,): rows (b, s, C) each."""
    use_input_stats = module.training or not module.track_running_stats

    def normalize(x: Tensor) -> Tensor:  # never passes running statistics it could update
        running = (None, None) if use_input_stats else (module.running_mean, module.running_var)
        return F.instance_norm(x, *running, use_input_stats=use_input_stats, eps=module.eps)

    return norm_factors(module, calls, ctx, normalize, 1)
