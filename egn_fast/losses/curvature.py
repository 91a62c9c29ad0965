"""Row estimators: which rows J̃ = SᵀJ stand for the curvature H (docs/design.md §1.1).

    curvature="exact"      S_i S_iᵀ = Q_i, the loss's own factor (s = c − 1 for cross-entropy,
                           T·(V−1) per token): H exactly, g in the rows' span.
    curvature="mc"         k rows per sample: S_i[:, j] = r_i(ŷ_ij) / √(a·k) with ŷ_ij drawn from
                           the model's predictive distribution (loss.sample_targets; per token:
                           one label per counted token, so column j is the cotangent Σ_t (p_it − e_ŷ)
                           of a whole sequence) and E[r(ŷ)r(ŷ)ᵀ] = a·Q_i. Ĥ = (1/b)J̃ᵀJ̃ is unbiased
                           for H, m = b·k whatever T and V; g is not in the rows' span, so the step
                           is the Woodbury form (egn_fast.system.WoodburySystem), exact for the
                           labels drawn.
    curvature="empirical"  one row per sample from the true targets: S_i = r_i / √a, w_i = √a —
                           the "mc" estimator with the true labels in place of drawn ones (the
                           empirical Fisher, in the same normalization): biased, cheapest, and g
                           lies in the rows' span (the ordinary row-space step).

Draws use `generator` (the global RNG of the outputs' device when None) and are returned as
`samples` (k, *targets.shape), so a test can rebuild Ĥ from them. A loss bound to one rank's
share of a global batch (`Loss.with_share`) draws the global batch's random numbers and keeps its
own samples' (egn_fast.losses.share), so the labels do not depend on how the batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import Backend
from .heads import Loss, LossHead

__all__ = ["CURVATURES", "check_curvature", "Rows", "rows_for"]

CURVATURES = ("exact", "mc", "empirical")
_CHUNK_ELEMENTS = 1 << 26  # draws turned into cotangents at once (256 MiB of fp32)


def check_curvature(curvature: str, mc_samples: int, generator: torch.Generator | None = None, damping: float | None = None) -> None:
    """Refuse an unknown estimator, a sample count that is not a positive int, a non-generator,
    and damping 0 with Monte-Carlo rows (Ĥ has rank ≤ b·mc_samples: Ĥ + 0·I is singular)."""
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; expected one of {', '.join(map(repr, CURVATURES))}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an int ≥ 1, got {mc_samples!r}")
    if curvature != "mc" and mc_samples != 1:
        raise ValueError(f"mc_samples={mc_samples} is for curvature='mc'; curvature={curvature!r} has its own rows")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if curvature == "mc" and damping == 0:
        raise ValueError("curvature='mc' needs damping > 0 (its estimate of H has rank ≤ b·mc_samples)")


@dataclass
class Rows:
    """The loss head with the estimator's rows (head.S; head.w None for "mc") and the drawn targets."""

    head: LossHead
    samples: Tensor | None  # (k, *targets.shape) for "mc", else None


def rows_for(
    loss: Loss,
    outputs: Tensor,
    targets: Tensor,
    curvature: str = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    backend: Backend | None = None,
) -> Rows:
    """The rows of `curvature` at outputs (b, c) for checked targets.

    exact: loss.head. empirical: S (b, c, 1), w (b, 1). mc: S (b, c, k), w None; the cotangents
    are k·b·c numbers (k·b·T·V per token), never a (V, V) block.
    """
    if curvature == "exact":
        return Rows(loss.head(outputs, targets, backend), None)
    with torch.no_grad():
        per_sample, r = loss.per_sample(outputs, targets), loss.residual(outputs, targets)
        a = loss.curvature_scale(outputs, targets)
        if curvature == "empirical":
            w = torch.full((r.shape[0], 1), a**0.5, dtype=r.dtype, device=r.device)
            return Rows(LossHead(per_sample, r, (r / a**0.5).unsqueeze(2), w), None)
        samples = loss.sample_targets(outputs, targets, mc_samples, generator)
        # draws in chunks of ≤ _CHUNK_ELEMENTS cotangent numbers, each chunk one call as a batch
        # of chunk·b samples (a per-token scale b/N is unchanged)
        b, c = outputs.shape
        S = outputs.new_empty(b, c, mc_samples)
        step = max(1, _CHUNK_ELEMENTS // (b * c))
        for j in range(0, mc_samples, step):
            y = samples[j : j + step]
            drawn = loss.residual(outputs.repeat(len(y), 1), y.reshape(len(y) * b, *y.shape[2:]))
            S[:, :, j : j + len(y)] = drawn.view(len(y), b, c).permute(1, 2, 0)
        return Rows(LossHead(per_sample, r, S / (a * mc_samples) ** 0.5, None), samples)
