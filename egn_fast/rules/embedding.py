"""The rule for nn.Embedding: the input is token indices, so the Gram compares tokens instead of
multiplying activations (gram_embedding) and the back-projection is a scatter-add."""

from __future__ import annotations

from torch import nn

from ..capture.hooks import ModuleCall
from .factors import EmbeddingFactors, concat
from .registry import RuleContext, first_input, register_rule, used_calls

__all__ = ["embedding_factors"]


@register_rule(nn.Embedding)
def embedding_factors(module: nn.Embedding, calls: list[ModuleCall], ctx: RuleContext) -> EmbeddingFactors | None:
    """tokens (b, T) and G (b, s, T, dim) of every call, concatenated along T."""
    weight = ctx.trainable(module.weight)
    if weight is None:
        return None
    tok_parts, G_parts = [], []
    for call, G in used_calls(calls):
        tokens = first_input(call, ctx)
        tokens = tokens.reshape(ctx.b, -1)
        G = G.reshape(ctx.b, ctx.s, -1, G.shape[-1])
        if module.padding_idx is not None:  # the padding row gets no gradient
            G = G * (tokens != module.padding_idx)[:, None, :, None].to(G.dtype)
        tok_parts.append(tokens)
        G_parts.append(G)
    if not tok_parts:
        return None
    return EmbeddingFactors(weight, concat(tok_parts, 1), concat(G_parts, 2))
