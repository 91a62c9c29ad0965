"""Loss heads: the per-sample residual r, curvature factor S and row-space right-hand side w.

Conventions (docs/design.md §1): the loss is a mean over the batch, L = (1/b) Σ_i ℓ_i(f_i, y_i), with
f_i ∈ R^c the flattened output of sample i.

    r_i = ∂ℓ_i/∂f_i               (b, c)
    Q_i = ∂²ℓ_i/∂f_i² = S_i S_iᵀ   S: (b, c, s)
    S_i w_i = r_i                  w: (b, s)

The EGN system is then (K + bλI) γ = w with K = J̃J̃ᵀ, J̃ = SᵀJ (m = b·s rows, sample-major).

For the estimated curvatures (egn_fast.losses.curvature) a loss also gives its residual alone
(`residual`), targets drawn from the model's predictive distribution (`sample_targets`, for
Monte-Carlo rows) and `curvature_scale` a, with E_ŷ[r(ŷ) r(ŷ)ᵀ] = a·Q_i. Cross-entropy, also per
token, is in egn_fast.losses.cross_entropy.

On one rank of a data-parallel group a loss is evaluated on the rank's samples of the global
batch: `with_share(share)` gives the loss bound to that share (egn_fast.losses.share), whose
values use the global batch where the loss involves it (the per-token mean) and whose draws are
the global batch's; without a share (one process) the batch given is the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import copy

import torch
from torch import Tensor

from ..checks import all_finite
from ..ops import Backend
from .share import BatchShare, draw

__all__ = [
    "LossHead",
    "Loss",
    "MSELoss",
    "BCEWithLogitsLoss",
    "AutogradLoss",
    "ScaledLoss",
]


@dataclass
class LossHead:
    """What the rest of the pipeline needs from a loss, evaluated at the current outputs.

    per_sample: (b,)      ℓ_i
    r:          (b, c)    ∂ℓ_i/∂f_i
    S:          (b, c, s) factor of the output Hessian, S_i S_iᵀ = Q_i (or of its estimate)
    w:          (b, s)    coefficients with S_i w_i = r_i; None for Monte-Carlo rows, whose span
                          need not hold r (the step is then the Woodbury form, egn_fast.system)
    """

    per_sample: Tensor
    r: Tensor
    S: Tensor
    w: Tensor | None

    @property
    def value(self) -> Tensor:
        """The batch loss L = mean_i ℓ_i (a 0-d tensor)."""
        return self.per_sample.mean()


class Loss:
    """Base class of loss heads.

    Subclasses implement `per_sample(outputs, targets) -> (b,)` and `head(outputs, targets, backend)`;
    `backend` supplies the ops for a head's batched linear algebra (AutogradLoss's Cholesky;
    None = torch), closed-form heads do not need it.
    A custom loss only needs `per_sample` and `residual_and_factor`; `head` then finds w by a
    batched least-squares solve of S w = r (exact when r lies in range(S), as it must).
    `outputs` is always (b, c) here; `targets` has been checked by `check_targets`.
    """

    name = "custom"
    share: BatchShare | None = None  # this rank's part of a global batch (with_share); None: the batch is whole

    def with_share(self, share: BatchShare | None) -> Loss:
        """This loss for one rank's samples of a global batch (a copy with `share` set), or self
        for share=None. Per-sample losses compute the same values either way; the share changes
        the per-token mean's b/N and which random numbers `sample_targets` uses."""
        if share is None:
            return self
        bound = copy.copy(self)
        bound.share = share
        return bound

    def count_tokens(self, targets: Tensor) -> int:
        """The units the batch loss averages over in checked targets: samples (b), or counted
        tokens for per-token cross-entropy (what `BatchShare.tokens` sums over ranks)."""
        return targets.shape[0]

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Validate targets against outputs (b, c); return them reshaped for this loss."""
        b, c = outputs.shape
        if not isinstance(targets, Tensor):
            raise ValueError(f"{self.name}: targets must be a tensor, got {type(targets).__name__}")
        if targets.shape[0:1] != (b,) or targets.numel() != b * c:
            raise ValueError(
                f"{self.name}: targets of shape {tuple(targets.shape)} do not match outputs with "
                f"{b} samples × {c} values per sample (expected (b, …) with {c} values per sample)"
            )
        targets = targets.reshape(b, c).to(outputs.dtype)
        if not all_finite(targets):
            raise ValueError(f"{self.name}: targets contain non-finite values")
        return targets

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def batch_mean(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """L = (1/b) Σ ℓ_i for model outputs (b, …) flattened to (b, c) and targets as given
        (checked here); differentiable, so baselines train on exactly the loss EGN minimizes."""
        f = outputs.reshape(outputs.shape[0], -1)
        return self.per_sample(f, self.check_targets(f, targets)).mean()

    def check_output_shape(self, shape: tuple[int, ...], targets: object) -> None:
        """Refuse model outputs of `shape` (b, …), before flattening, that the targets as given
        would misread (a loss that cares about more than c); the default accepts any."""

    def residual_and_factor(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Return r (b, c) and S (b, c, s) with S_i S_iᵀ = ∂²ℓ_i/∂f_i²."""
        raise NotImplementedError

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """r (b, c) without the Hessian factor (the estimated curvatures need only r)."""
        return self.head(outputs, targets).r

    def sample_targets(self, outputs: Tensor, targets: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        """k targets per sample drawn from the model's predictive distribution at `outputs`:
        (k, *targets.shape), with E_ŷ[r(ŷ) r(ŷ)ᵀ] = curvature_scale · Q_i (Monte-Carlo rows)."""
        raise ValueError(
            f"curvature='mc' draws targets from the model's predictive distribution, which the loss {self.name!r} "
            "does not define (a custom loss); use curvature='exact' or 'empirical', or a named loss"
        )

    def curvature_scale(self, outputs: Tensor, targets: Tensor) -> float:
        """a with E_ŷ[r(ŷ) r(ŷ)ᵀ] = a·Q_i for targets drawn by `sample_targets` (1 for a loss that
        is a negative log-likelihood of its predictive distribution)."""
        return 1.0

    def head(self, outputs: Tensor, targets: Tensor, backend: Backend | None = None) -> LossHead:
        with torch.no_grad():
            r, S = self.residual_and_factor(outputs, targets)
            w = torch.linalg.lstsq(S, r.unsqueeze(-1)).solution.squeeze(-1)
            return LossHead(self.per_sample(outputs, targets), r, S, w)


class MSELoss(Loss):
    """ℓ_i = ½‖f_i − y_i‖²: r = f − y, Q = I, S = I (s = c), w = r."""

    name = "mse"

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).square().sum(1)

    def head(self, outputs: Tensor, targets: Tensor, backend: Backend | None = None) -> LossHead:
        with torch.no_grad():
            b, c = outputs.shape
            r = outputs - targets
            S = torch.eye(c, dtype=outputs.dtype, device=outputs.device).expand(b, c, c)
            return LossHead(0.5 * r.square().sum(1), r, S, r)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs - targets

    def sample_targets(self, outputs: Tensor, targets: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        """ŷ = f + ε, ε ~ N(0, I) (the Gaussian the squared error is the log-likelihood of): r = −ε."""
        noise = draw(torch.randn, (k, *outputs.shape), generator, outputs, self.share)
        return outputs.detach() + noise.to(outputs.dtype)


class BCEWithLogitsLoss(Loss):
    """ℓ_i = Σ_k softplus(f_ik) − y_ik f_ik (binary cross-entropy on logits, y ∈ [0, 1]).

    r = σ(f) − y, Q = diag(q), q = σ(f)σ(−f), S = diag(√q), w = r/√q. q is clamped to the
    dtype's smallest normal number so saturated logits keep a finite w (S w = r still holds).
    """

    name = "bce"

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = super().check_targets(outputs, targets)
        if (targets < 0).any() or (targets > 1).any():
            raise ValueError("bce: targets must lie in [0, 1]")
        return targets

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (torch.nn.functional.softplus(outputs) - targets * outputs).sum(1)

    def head(self, outputs: Tensor, targets: Tensor, backend: Backend | None = None) -> LossHead:
        with torch.no_grad():
            p = torch.sigmoid(outputs)
            q = (p * torch.sigmoid(-outputs)).clamp(min=torch.finfo(p.dtype).tiny)
            sqrt_q = q.sqrt()
            r = p - targets
            return LossHead(self.per_sample(outputs, targets), r, torch.diag_embed(sqrt_q), r / sqrt_q)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.sigmoid(outputs) - targets

    def sample_targets(self, outputs: Tensor, targets: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        """ŷ ~ Bernoulli(σ(f)) per output, as 0.0/1.0."""
        u = draw(torch.rand, (k, *outputs.shape), generator, outputs, self.share)
        return (u < torch.sigmoid(outputs.detach().double())).to(outputs.dtype)


class AutogradLoss(Loss):
    """Any per-sample loss ℓ(f_i, y_i) -> scalar, differentiated by torch.func.

    r_i = ∇ℓ, Q_i = ∇²ℓ (reverse over reverse, vmapped over the batch), S_i = chol(Q_i + εI) with
    ε = jitter · mean|diag Q_i| (retried ×10 up to 4 times when Q_i is only semi-definite), and
    w_i = S_i⁻¹ r_i. r, Q, S and w are computed in float64 (outputs and floating targets cast) and
    returned in the outputs' dtype: in float32 the rounding of a singular Q (softmax's) would be
    far above ε. Exact up to ε; a loss whose output Hessian is indefinite (Gauss-Newton needs a
    convex loss in f) raises.

    fn(f_i (c,), y_i) -> 0-d tensor; targets are passed through unchanged (any shape (b, …)).
    """

    name = "autograd"

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], jitter: float = 1e-12):
        self.fn = fn
        self.jitter = jitter
        self.name = getattr(fn, "__name__", "autograd")

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if not isinstance(targets, Tensor) or targets.shape[:1] != outputs.shape[:1]:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"{self.name}: targets {shape} must be a tensor with {outputs.shape[0]} samples"
            )
        return targets

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.func.vmap(self.fn)(outputs, targets)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        y = targets.double() if targets.is_floating_point() else targets
        return torch.func.vmap(torch.func.grad(self.fn))(outputs.detach().double(), y).to(outputs.dtype)

    def residual_and_factor(
        self, outputs: Tensor, targets: Tensor, backend: Backend | None = None
    ) -> tuple[Tensor, Tensor]:
        """r (b, c) and S (b, c, c), both float64."""
        f = outputs.detach().double()
        y = targets.double() if targets.is_floating_point() else targets
        r = torch.func.vmap(torch.func.grad(self.fn))(f, y)
        # jacrev of the gradient, not torch.func.hessian: forward-mode AD's first use scripts
        # decompositions with the deprecated torch.jit.script (a FutureWarning in every process)
        Q = torch.func.vmap(torch.func.jacrev(torch.func.grad(self.fn)))(f, y)
        Q = 0.5 * (Q + Q.transpose(1, 2))
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        # a sample without curvature (Huber beyond δ: Q_i = 0, r_i ≠ 0) takes the batch's largest
        # scale (1 when no sample has curvature), so ε·scale stays normal and w = S⁻¹r finite
        scale = Q.diagonal(dim1=1, dim2=2).abs().mean(1)
        scale = torch.where(scale > 0, scale, scale.max() if scale.max() > 0 else 1.0)
        eps = self.jitter
        for _ in range(5):
            S, info = (backend or Backend()).cholesky_batched(Q + (eps * scale)[:, None, None] * eye)
            if not info.any():
                return r, S
            eps *= 10.0
        bad = int(info.nonzero()[0, 0])
        raise ValueError(
            f"{self.name}: the output Hessian of sample {bad} is not positive semi-definite "
            "(Gauss-Newton needs a loss that is convex in the outputs)"
        )

    def head(self, outputs: Tensor, targets: Tensor, backend: Backend | None = None) -> LossHead:
        with torch.no_grad():
            r, S = self.residual_and_factor(outputs, targets, backend)
            w = torch.linalg.solve_triangular(S, r.unsqueeze(-1), upper=False).squeeze(-1)
            r, S, w = (t.to(outputs.dtype) for t in (r, S, w))
            return LossHead(self.per_sample(outputs, targets), r, S, w)


class ScaledLoss(Loss):
    """a·ℓ_i for a base loss ℓ: r → a·r, Q → a·Q, S → √a·S, w → √a·w (S w = r still holds), with
    a = factor, divided by the number of outputs per sample c when `per_output`. torch's loss
    modules average over every output; this is how they map onto egn_fast's per-sample losses."""

    def __init__(self, base: Loss, factor: float, per_output: bool, name: str):
        self.base, self.factor, self.per_output, self.name = base, factor, per_output, name

    def with_share(self, share: BatchShare | None) -> Loss:
        return self if share is None else ScaledLoss(self.base.with_share(share), self.factor, self.per_output, self.name)

    def count_tokens(self, targets: Tensor) -> int:
        return self.base.count_tokens(targets)

    def scale(self, outputs: Tensor) -> float:
        """a for outputs (b, c)."""
        return self.factor / outputs.shape[1] if self.per_output else self.factor

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.base.check_targets(outputs, targets)

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.scale(outputs) * self.base.per_sample(outputs, targets)

    def head(self, outputs: Tensor, targets: Tensor, backend: Backend | None = None) -> LossHead:
        head, a = self.base.head(outputs, targets, backend), self.scale(outputs)
        return LossHead(a * head.per_sample, a * head.r, a**0.5 * head.S, a**0.5 * head.w)

    def check_output_shape(self, shape: tuple[int, ...], targets: object) -> None:
        self.base.check_output_shape(shape, targets)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.scale(outputs) * self.base.residual(outputs, targets)

    def sample_targets(self, outputs: Tensor, targets: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        return self.base.sample_targets(outputs, targets, k, generator)

    def curvature_scale(self, outputs: Tensor, targets: Tensor) -> float:
        return self.scale(outputs) * self.base.curvature_scale(outputs, targets)

