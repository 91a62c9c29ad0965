"""The rule for nn.EmbeddingBag: with a 2-D input (b, bag) every row is one sample's bag, so the
per-sample gradients of the generic rule are exact (any mode, per_sample_weights (b, bag)
included). A 1-D input with offsets packs all bags into one row of indices and is refused."""

from __future__ import annotations

from torch import nn

from ..capture import ModuleCall
from .factors import PerSampleFactors
from .generic import generic_factors
from .registry import RuleContext, first_input, register_rule

__all__ = ["embedding_bag_factors"]


@register_rule(nn.EmbeddingBag)
def embedding_bag_factors(module: nn.EmbeddingBag, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """tokens (b, bag) per call: rows (b, s, num_embeddings, dim) for the weight."""
    weight = ctx.trainable(module.weight)
    if weight is None:
        return None
    for call in calls:
        if first_input(call).dim() != 2:
            raise ValueError(
                f"module {ctx.name!r} (EmbeddingBag) received a 1-D input with offsets, which packs all "
                "samples' bags into one row; pass a 2-D input (b, bag_size), one bag per sample, padded "
                "with padding_idx (excluded from every reduction)"
            )
    return generic_factors(module, calls, ctx, {"weight": weight})
