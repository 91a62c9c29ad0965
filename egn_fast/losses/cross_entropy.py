"""Cross-entropy on logits, per sample or per token (docs/design.md §1).

Per sample: outputs (b, C), targets (b,) class indices: ℓ_i = −log softmax(f_i)[y_i].

Per token: outputs (b, T, V) (classes last; any (b, T₁, …, V)), targets (b, T) with
`ignore_index` (−100, torch's) for tokens that do not count. The batch loss is the mean over the
N counted tokens, exactly F.cross_entropy(f.reshape(-1, V), y.reshape(-1)); in egn_fast's
per-sample form (L = mean_i ℓ_i) that is ℓ_i = (b/N) Σ_t ℓ_it, so H = (1/N) Σ_{i,t} J_itᵀ Q_it J_it
and λ means what it means for any loss. The exact factor is block-diagonal, one (V, V−1) block
per token (s = T·(V−1), zero for ignored tokens): for small vocabularies; curvature="mc"
(egn_fast.losses.curvature) needs only r and drawn labels. On one rank of a data-parallel group
(`with_share`) b and N are the global batch's: the mean is over every rank's counted tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import Backend
from .heads import Loss, LossHead
from .share import draw

__all__ = ["CrossEntropyLoss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class CrossEntropyLoss(Loss):
    """Cross-entropy with integer targets, per sample (targets (b,)) or per token (targets (b, T)).

    Per sample: r = p − e_y, Q = diag(p) − ppᵀ. The full factor S = diag(√p) − p√pᵀ has √p in its
    null space, so by default (`reduced=True`) we use the rank-(C−1) factor S' = diag(√p) U with U
    an orthonormal basis of √p⊥ (a Householder reflection that maps √p to −e_j, j = argmax p,
    minus its column j): one row fewer per sample, s = C − 1, same K + bλI solution.
    w = Uᵀ(√p − e_y/√p_y) solves S' w = r.
    Per token: the same per token, scaled by a = b/N (N counted tokens); see the module docstring.
    per_token=False refuses (b, T) targets (torch.nn.CrossEntropyLoss, whose classes are on dim 1).
    """

    name = "cross_entropy"

    def __init__(self, reduced: bool = True, per_token: bool = True):
        self.reduced = reduced
        self.per_token = per_token

    # ------------------------------------------------------------------ targets

    def check_output_shape(self, shape: tuple[int, ...], targets: object) -> None:
        if not (self.per_token and isinstance(targets, Tensor) and targets.dim() >= 2) or targets.is_floating_point():
            return  # not per-token targets (check_targets says what is wrong with them)
        if tuple(shape[:-1]) != tuple(targets.shape) or len(shape) < 3:
            raise ValueError(
                f"cross_entropy: per-token targets {tuple(targets.shape)} need outputs (b, T, V) with the classes last, "
                f"(b, T) = the targets' shape; got outputs {tuple(shape)} (torch's (b, V, T) layout: pass logits.transpose(1, 2))"
            )

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        b, c = outputs.shape
        if not isinstance(targets, Tensor):
            raise ValueError(f"cross_entropy: targets must be a tensor, got {type(targets).__name__}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f"cross_entropy: targets must be integer class indices, got dtype {targets.dtype}")
        if targets.dim() >= 2 and len(targets) == b:
            return self._check_token_targets(outputs, targets)
        if targets.shape != (b,):
            raise ValueError(
                f"cross_entropy: targets of shape {tuple(targets.shape)} do not match outputs of "
                f"shape {(b, c)} (expected ({b},) class indices, or (b, T) per token)"
            )
        if c < 2:
            raise ValueError(f"cross_entropy needs at least 2 classes, outputs have {c}")
        lo, hi = (int(v) for v in torch.aminmax(targets))
        if lo < 0 or hi >= c:
            raise ValueError(f"cross_entropy: class index {lo if lo < 0 else hi} out of range [0, {c})")
        return targets.long()

    def _check_token_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        b, c = outputs.shape
        if not self.per_token:
            raise ValueError(
                f"torch.nn.CrossEntropyLoss: targets {tuple(targets.shape)} are per token; torch's module takes the classes "
                "on dimension 1, egn_fast's per-token loss takes them last: use loss='cross_entropy' with outputs (b, T, V)"
            )
        T = targets[0].numel()
        if c % T or c // T < 2:
            raise ValueError(
                f"cross_entropy: targets {tuple(targets.shape)} are one class per token ({T} tokens), which needs outputs "
                f"with V ≥ 2 logits per token; the outputs have {c} values per sample"
            )
        V = c // T
        y = targets.reshape(b, T).long()
        counted = y != IGNORE_INDEX
        if not counted.any():  # refused by _token_scale unless other ranks' shards count tokens
            return y
        lo, hi = (int(v) for v in torch.aminmax(y[counted]))
        if lo < 0 or hi >= V:
            raise ValueError(
                f"cross_entropy: class index {lo if lo < 0 else hi} out of range [0, {V}) (ignored tokens: {IGNORE_INDEX})"
            )
        return y

    # ------------------------------------------------------------------ values

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 1:
            return -torch.log_softmax(outputs, 1).gather(1, targets[:, None]).squeeze(1)
        b, T = targets.shape
        counted = targets != IGNORE_INDEX
        logp = torch.log_softmax(outputs.reshape(b, T, -1), 2)
        tok = -logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
        return torch.where(counted, tok, 0.0).sum(1) * self._token_scale(targets)

    def curvature_scale(self, outputs: Tensor, targets: Tensor) -> float:
        return 1.0 if targets.dim() == 1 else self._token_scale(targets)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """p − e_y per sample, or per counted token scaled by b/N (zero for ignored tokens)."""
        with torch.no_grad():
            tokens = targets[:, None] if targets.dim() == 1 else targets  # (b,) is one token per sample
            b, T = tokens.shape
            r = _residual(torch.softmax(outputs.reshape(b, T, -1), 2), tokens.clamp(min=0))
            if targets.dim() == 2:
                r = torch.where((tokens != IGNORE_INDEX)[..., None], r, 0.0) * self._token_scale(targets)
            return r.view(b, -1)

    def sample_targets(self, outputs: Tensor, targets: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        """ŷ ~ softmax(f) per sample, or per counted token (ignored tokens stay ignore_index):
        (k, b) or (k, b, T), long. By inverse CDF from uniforms u (k, b, T) (`draw`: the global
        batch's with a share, so the labels do not depend on how the batch is split): ŷ is the
        first class whose cumulative probability exceeds u·Σp; a class of probability 0 is never drawn."""
        b = outputs.shape[0]
        T = 1 if targets.dim() == 1 else targets.shape[1]
        p = torch.softmax(outputs.detach().reshape(b, T, -1).to(torch.promote_types(outputs.dtype, torch.float32)), 2)
        cdf = p.cumsum_(2)  # (b, T, V), in place: p is not needed again
        total = cdf[..., -1:].contiguous()
        last = torch.searchsorted(cdf, total)  # the last class of positive probability (cdf reaches its total there)
        u = draw(torch.rand, (k, b, T), generator, outputs, self.share)  # float64
        drawn = torch.empty(k, b, T, dtype=torch.long, device=outputs.device)
        for j in range(k):  # one (b, T, V) search at a time
            v = (u[j, ..., None] * total.double()).to(cdf.dtype)
            drawn[j] = torch.minimum(torch.searchsorted(cdf, v, right=True), last).squeeze(2)  # rounding: v ≥ total
        drawn = drawn.view(k, *targets.shape)
        return drawn if targets.dim() == 1 else torch.where(targets != IGNORE_INDEX, drawn, IGNORE_INDEX)

    def count_tokens(self, targets: Tensor) -> int:
        return targets.shape[0] if targets.dim() == 1 else int((targets != IGNORE_INDEX).sum())

    def _token_scale(self, targets: Tensor) -> float:
        """a = b/N for per-token targets (b, T): ℓ_i = a Σ_t ℓ_it makes mean_i ℓ_i the token mean;
        with a share, b and N are the global batch's (the rank's own targets may count none)."""
        b, n = (targets.shape[0], self.count_tokens(targets)) if self.share is None else (self.share.b, self.share.tokens)
        if n == 0:
            raise ValueError(f"cross_entropy: every target is ignore_index ({IGNORE_INDEX}): no token to fit")
        return b / n

    # ------------------------------------------------------------------ the exact head

    def head(self, outputs: Tensor, targets: Tensor, backend: Backend | None = None) -> LossHead:
        with torch.no_grad():
            if targets.dim() == 1:
                return self._sample_head(outputs, targets)
            b, T = targets.shape
            V = outputs.shape[1] // T
            counted = targets.reshape(b * T, 1) != IGNORE_INDEX
            tok = self._sample_head(outputs.reshape(b * T, V), targets.clamp(min=0).reshape(-1))
            a = self._token_scale(targets)
            s_tok = tok.S.shape[2]
            r = torch.where(counted, tok.r, 0.0).view(b, T * V) * a
            w = torch.where(counted, tok.w, 0.0).view(b, T * s_tok) * a**0.5
            S_tok = torch.where(counted[:, :, None], tok.S, 0.0).view(b, T, V, s_tok) * a**0.5
            S = outputs.new_zeros(b, T, V, T, s_tok)
            t = torch.arange(T, device=outputs.device)
            S[:, t, :, t, :] = S_tok.transpose(0, 1)  # block t of sample i on the diagonal
            per_sample = torch.where(counted, tok.per_sample[:, None], 0.0).view(b, T).sum(1) * a
            return LossHead(per_sample, r, S.view(b, T * V, T * s_tok), w)

    def _sample_head(self, outputs: Tensor, targets: Tensor) -> LossHead:
        """The per-sample head of outputs (n, C) and targets (n,)."""
        b, c = outputs.shape
        logp = torch.log_softmax(outputs, 1)
        p = logp.exp()
        sqrt_p = (0.5 * logp).exp()  # no underflow until log p < 2·log(tiny)
        onehot = F.one_hot(targets, c).to(outputs.dtype)
        r = _residual(p, targets)
        logp_y = logp.gather(1, targets[:, None])
        per_sample = -logp_y.squeeze(1)
        # w = √p − e_y/√p_y; p_y clamped to the dtype's smallest normal so w stays finite.
        inv_sqrt_py = (-0.5 * logp_y).exp().clamp(max=torch.finfo(p.dtype).tiny ** -0.5)
        w_full = sqrt_p - onehot * inv_sqrt_py
        if not self.reduced:
            S = torch.diag_embed(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]
            return LossHead(per_sample, r, S, w_full)
        # Householder H = I − v vᵀ/(1+√p_j), v = √p + e_j: H√p = −e_j, H symmetric orthogonal;
        # U = H without column j. S' = diag(√p) U, w' = Uᵀ w = (H w)[keep], no c×c GEMMs.
        j = p.argmax(1, keepdim=True)  # (b, 1)
        v = sqrt_p.scatter_add(1, j, torch.ones_like(logp_y))
        coef = v / (1.0 + sqrt_p.gather(1, j))  # H = I − v coefᵀ
        cols = torch.arange(c - 1, device=p.device).expand(b, c - 1)
        keep = cols + (cols >= j).long()  # (b, c−1): every column but j
        S = (sqrt_p * v).unsqueeze(2) * coef.gather(1, keep).neg().unsqueeze(1)
        S.scatter_add_(1, keep.unsqueeze(1), sqrt_p.gather(1, keep).unsqueeze(1))  # + diag(√p)[:, keep]
        w = w_full.gather(1, keep) - v.gather(1, keep) * (coef * w_full).sum(1, keepdim=True)
        return LossHead(per_sample, r, S, w)


def _residual(p: Tensor, y: Tensor) -> Tensor:
    """r = p − e_y over the last dimension (p (…, V), y (…)), its y entry as −Σ_{k≠y} p_k: p_y − 1
    cancels to nothing when the model is sure and right."""
    y = y[..., None]
    return p.scatter(-1, y, -p.scatter(-1, y, 0.0).sum(-1, keepdim=True))


