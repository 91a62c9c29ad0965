"""The rule for nn.EmbeddingBag: bag i is sample i, so z_i = Σ_j c_ij ∘ E[tok_ij] over the bag's
tokens, with coefficients c that do not depend on E once the forward picked them: per_sample_weights
(or 1) for "sum", 1/|bag| for "mean", the one-hot of the maximizing token per dimension for "max";
padding_idx tokens get 0. That is an Embedding on the bag's tokens with output-gradients G_i ∘ c_ij:
`EmbeddingFactors` (Gram by token comparison, scatter-add back-projection).

Bags come as rows of a 2-D input (b, bag) or as a 1-D input with offsets (one bag per sample,
padded here to the longest bag with coefficient 0). The rule checks that Σ_j c_ij ∘ E[tok_ij]
reproduces the recorded output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capture.hooks import ModuleCall
from ..dtensors import full_value
from .factors import EmbeddingFactors, concat
from .registry import RuleContext, register_rule, used_calls

__all__ = ["embedding_bag_factors"]

_REPRODUCE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _padded_bags(module: nn.EmbeddingBag, call: ModuleCall) -> tuple[Tensor, Tensor, Tensor | None]:
    """tokens (b, L), valid (b, L) bool and per_sample_weights (b, L) or None, one bag per row."""
    names = ("input", "offsets", "per_sample_weights")
    given = dict(zip(names, call.args)) | {n: call.kwargs[n] for n in names if n in call.kwargs}
    tokens, offsets, weights = given["input"], given.get("offsets"), given.get("per_sample_weights")
    if tokens.dim() == 2:
        return tokens, torch.ones_like(tokens, dtype=torch.bool), weights
    starts = offsets[:-1] if module.include_last_offset else offsets
    ends = torch.cat([offsets[1:], offsets.new_tensor([tokens.shape[0]])])[: starts.shape[0]]
    lengths = ends - starts
    position = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=tokens.device)
    valid = position < lengths[:, None]
    index = torch.where(valid, starts[:, None] + position, 0)
    return tokens[index], valid, None if weights is None else weights[index] * valid


def _coefficients(module: nn.EmbeddingBag, table: Tensor, tokens: Tensor, valid: Tensor, weights: Tensor | None) -> Tensor:
    """c (b, L, 1) for "sum"/"mean", (b, L, dim) for "max": z_i = Σ_j c_ij ∘ E[tok_ij] (table E: the weight's values)."""
    if module.padding_idx is not None:
        valid = valid & (tokens != module.padding_idx)
    mask = valid.to(table.dtype)
    if module.mode == "sum":
        return (mask if weights is None else mask * weights.to(table.dtype)).unsqueeze(2)
    if module.mode == "mean":
        return (mask / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(2)
    rows = table[tokens].masked_fill(~valid.unsqueeze(2), float("-inf"))  # (b, L, dim)
    best = rows.argmax(1, keepdim=True)
    picked = torch.zeros_like(rows).scatter_(1, best, 1.0)
    return picked * valid.any(1)[:, None, None].to(table.dtype)  # an empty bag outputs 0


@register_rule(nn.EmbeddingBag)
def embedding_bag_factors(module: nn.EmbeddingBag, calls: list[ModuleCall], ctx: RuleContext) -> EmbeddingFactors | None:
    """tokens (b, L) and G (b, s, L, dim) = G_i ∘ c_ij of every call, concatenated along L."""
    weight = ctx.trainable(module.weight)
    if weight is None:
        return None
    table = full_value(module.weight)  # a sharded weight all-gathered, for this module only
    tok_parts, G_parts = [], []
    for call, G in used_calls(calls):
        tokens, valid, weights = _padded_bags(module, call)
        if tokens.shape[0] != ctx.b:
            raise ValueError(f"module {ctx.name!r} (EmbeddingBag) received {tokens.shape[0]} bags for {ctx.b} samples; "
                             "egn_fast needs one bag per sample")
        c = _coefficients(module, table, tokens, valid, weights)
        recorded = call.outputs[0].detach()
        reproduced = (c * table[tokens]).sum(1)
        tol = _REPRODUCE_TOL.get(recorded.dtype, 1e-2)
        if not torch.allclose(reproduced.to(recorded.dtype), recorded, rtol=tol, atol=tol):
            raise ValueError(f"module {ctx.name!r} (EmbeddingBag, mode={module.mode!r}): its bags could not be "
                             "mapped to the samples (the output is not reproduced); please report this call")
        tok_parts.append(tokens)
        G_parts.append(G.unsqueeze(2) * c.unsqueeze(1).to(G.dtype))
    if not tok_parts:
        return None
    return EmbeddingFactors(weight, concat(tok_parts, 1), concat(G_parts, 2))
