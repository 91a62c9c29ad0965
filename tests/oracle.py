"""The oracle: a dense float64 Jacobian by torch.func and the d×d Levenberg–Marquardt solve (or,
for models too wide for d×d, the same dense J solved through the push-through identity)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def dense_jacobian(model: nn.Module, inputs) -> tuple[Tensor, Tensor]:
    """The outputs (b, c) and J (b·c × d), float64, trainable parameters in model order.

    inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments). Buffers are
    cloned for every evaluation, so a forward that updates a buffer in place (spectral_norm's u/v
    in train mode) is linearized at the state after one plain forward and the model is untouched.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().double() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    cast = lambda a: a.double() if isinstance(a, Tensor) and a.is_floating_point() else a
    kwargs = {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else {}
    args = () if isinstance(inputs, dict) else tuple(map(cast, inputs if isinstance(inputs, tuple) else (inputs,)))

    def f(ps: dict) -> Tensor:
        state = {**ps, **frozen, **{n: b.clone() for n, b in buffers.items()}}
        out = torch.func.functional_call(model, state, args, kwargs)
        return out.reshape(out.shape[0], -1)

    with torch.no_grad():
        out = f(params)
    b, c = out.shape
    jac = torch.func.jacrev(f)(params)
    return out, torch.cat([jac[n].reshape(b * c, -1) for n in names], 1)


def dense_terms(model: nn.Module, inputs, targets: Tensor, loss) -> tuple[Tensor, Tensor, Tensor]:
    """J (b·c × d), r (b·c) and the block-diagonal Q (b·c × b·c), float64; r and Q by autograd of
    `loss.per_sample` (an egn_fast Loss), independent of the loss head."""
    out, J = dense_jacobian(model, inputs)
    b = out.shape[0]
    y = targets.double() if targets.is_floating_point() else targets
    y = loss.check_targets(out, y)
    per_sample = lambda fo: loss.per_sample(fo, y).sum()
    r = torch.func.grad(per_sample)(out)  # (b, c)
    Q = torch.func.hessian(per_sample)(out)  # (b, c, b, c)
    Q = torch.stack([Q[i, :, i, :] for i in range(b)])
    return J, r.reshape(-1), torch.block_diag(*Q)


def dense_gradient_and_gn(model: nn.Module, inputs, targets: Tensor, loss) -> tuple[Tensor, Tensor]:
    """g = (1/b)Jᵀr and H = (1/b)JᵀQJ (flat, float64, trainable parameters in model order), by
    materializing J (b·c × d)."""
    J, r, Q = dense_terms(model, inputs, targets, loss)
    b = targets.shape[0]
    return J.T @ r / b, J.T @ Q @ J / b


def flat(xs: list[Tensor]) -> Tensor:
    """Concatenate tensors shaped like the parameters into one float64 vector."""
    return torch.cat([x.double().reshape(-1) for x in xs])


def unflat(model: nn.Module, v: Tensor) -> list[Tensor]:
    """Split a flat vector into tensors shaped like the model's trainable parameters."""
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    return [x.view(shape) for x, shape in zip(v.split([s.numel() for s in shapes]), shapes)]


def dense_direction(model: nn.Module, inputs, targets: Tensor, loss, damping: float) -> list[Tensor]:
    """d = −(H + λI)⁻¹g with H = (1/b)JᵀQJ, g = (1/b)Jᵀr, by materializing J (b·c × d) in float64."""
    g, H = dense_gradient_and_gn(model, inputs, targets, loss)
    return unflat(model, -torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), g))


def dense_direction_wide(model: nn.Module, inputs, targets: Tensor, loss, damping: float) -> list[Tensor]:
    """The same d for models too wide for a d×d solve (d ≫ b·c): J (b·c × d) is still
    materialized in float64 by torch.func, and d = −(1/b)Jᵀ(QJJᵀ/b + λI)⁻¹r, the push-through
    identity (JᵀQJ/b + λI)⁻¹Jᵀ = Jᵀ(QJJᵀ/b + λI)⁻¹ applied to the dense J (no factor S, no rules)."""
    J, r, Q = dense_terms(model, inputs, targets, loss)
    b = targets.shape[0]
    M = Q @ (J @ J.T) / b + damping * torch.eye(J.shape[0], dtype=J.dtype)
    return unflat(model, -(J.T @ torch.linalg.solve(M, r)) / b)


def dense_batch_loss_direction(model: nn.Module, inputs, targets: Tensor, batch_loss, damping: float) -> list[Tensor]:
    """d = −(H + λI)⁻¹g for a loss given only as a batch value L(outputs (b, c), targets), e.g. a torch
    loss module: g = Jᵀ∇L and H = Jᵀ(∇²L)J with ∇L, ∇²L of the whole batch by autograd, float64."""
    out, J = dense_jacobian(model, inputs)
    y = targets.double() if targets.is_floating_point() else targets
    value = lambda v: batch_loss(v.view(out.shape), y)
    v = out.reshape(-1)
    g = J.T @ torch.func.grad(value)(v)
    H = J.T @ torch.func.hessian(value)(v) @ J
    return unflat(model, -torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), g))


def rel_err(got: list[Tensor], want: list[Tensor]) -> float:
    g, w = flat(got), flat(want)
    return float((g - w).norm() / w.norm())
