"""What the step-time benchmarks time (step_time.py, step_time_sweep.py), and the sweep's oracle.

A `Case` is a model, a mini-batch and a loss. On a case, the methods, each a callable timed as is:

* egn        `egn_fast.direction(...)`, the method under test (`egn_direction`);
* egn_step   one `egn_fast.EGN` optimizer step on a private copy of the model (`make_egn_step`);
* sgd, adam  zero_grad + forward + loss + backward + `torch.optim` step (`make_optimizer_step`);
* matJ       the same direction from a materialized J̃ = SᵀJ (`materialized_direction`);
* somax      the authors' JAX library, when it imports (`make_somax`).

`make_method` builds the sweep's methods by name, each with the direction it is checked by; the
check is against `oracle_direction`, the LM direction in float64 from a loss factor derived
independently of egn_fast (`oracle_loss_factor`). All in float32 with damping λ = DAMPING.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import egn_fast
from egn_fast import resolve_loss

DAMPING = 1.0
SEED = 0


@dataclass
class Case:
    """One benchmark case: a model, a mini-batch and the loss (an egn_fast loss name)."""

    key: str
    title: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss: str
    data: str


# --------------------------------------------------------------------------- egn, sgd/adam, matJ (both benchmarks)


def torch_loss(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """The batch-mean loss in egn_fast's convention (mse: ½‖f − y‖² per sample)."""
    if loss == "mse":
        return 0.5 * (outputs - targets).square().sum(1).mean()
    return F.cross_entropy(outputs, targets)


FIRST_ORDER = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def make_optimizer_step(case: Case, name: str = "sgd") -> Callable[[], None]:
    """One first-order step (`name` in FIRST_ORDER, lr = 1e-3): zero_grad + forward + loss +
    backward + step, on a private copy of the model (so the other methods see fixed parameters)."""
    model = copy.deepcopy(case.model)
    opt = FIRST_ORDER[name](model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        torch_loss(case.loss, model(case.inputs), case.targets).backward()
        opt.step()

    return step


def egn_direction(case: Case) -> list[Tensor]:
    """egn_fast's direction: the method under test."""
    return egn_fast.direction(case.model, case.inputs, case.targets, loss=case.loss, damping=DAMPING)


def materialized_direction(case: Case) -> list[Tensor]:
    """The EGN direction from a materialized J̃ = SᵀJ (m × d), with the same loss head as egn_fast.

    Rows by `torch.func.jacrev` of θ ↦ (S_iᵀ f_i(θ))_i (S held constant), then K = J̃J̃ᵀ,
    (K + bλI)γ = w by Cholesky, d = −J̃ᵀγ split back into parameter shapes.
    """
    params = {n: p.detach() for n, p in case.model.named_parameters()}
    b = case.inputs.shape[0]

    def outputs(ps: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(case.model, ps, (case.inputs,)).reshape(b, -1)

    with torch.no_grad():
        f = outputs(params)
    loss = resolve_loss(case.loss)
    head = loss.head(f, loss.check_targets(f, case.targets))

    def rows(ps: dict[str, Tensor]) -> Tensor:  # (m,): S_iᵀ f_i for every sample, sample-major
        return torch.einsum("bc,bcs->bs", outputs(ps), head.S).reshape(-1)

    jac = torch.func.jacrev(rows)(params)
    J = torch.cat([jac[n].flatten(1) for n in params], 1)  # (m, d)
    K = J @ J.T
    K.diagonal().add_(b * DAMPING)
    gamma = torch.cholesky_solve(head.w.reshape(-1, 1), torch.linalg.cholesky(K))
    d = -(J.T @ gamma).squeeze(1)
    return [x.view_as(p) for x, p in zip(d.split([p.numel() for p in params.values()]), params.values())]


# --------------------------------------------------------------------------- the sweep's other methods, its oracle


def rows_per_sample(case: Case) -> int:
    """s, the rows of J̃ per sample of egn_fast's (and matJ's) system: c − 1 for cross-entropy."""
    with torch.no_grad():
        f = case.model(case.inputs).reshape(case.inputs.shape[0], -1)
    loss = resolve_loss(case.loss)
    return loss.head(f, loss.check_targets(f, case.targets)).S.shape[2]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad, in model order (the order of every direction)."""
    return [p for p in model.parameters() if p.requires_grad]


def step_change(params: list[Tensor], before: list[Tensor]) -> list[Tensor]:
    """θ' − θ per parameter: the direction of a step taken with lr = 1 (float32 rounding of θ
    adds about 1e-7·‖θ‖/‖d‖ to its relative error)."""
    return [p.detach() - q for p, q in zip(params, before)]


def make_egn_step(case: Case) -> Callable[[], object]:
    """One `egn_fast.EGN` optimizer step (forward, direction, update; lr = 1, λ = DAMPING, no
    line search or momentum) on a private copy of the model."""
    model = copy.deepcopy(case.model)
    opt = egn_fast.EGN(model, loss=case.loss, lr=1.0, damping=DAMPING)
    return lambda: opt.step(case.inputs, case.targets)


def egn_step_direction(case: Case) -> list[Tensor]:
    """The change of the parameters by one fresh EGN step with lr = 1 (= its direction)."""
    model = copy.deepcopy(case.model)
    before = [p.detach().clone() for p in trainable(model)]
    egn_fast.EGN(model, loss=case.loss, lr=1.0, damping=DAMPING).step(case.inputs, case.targets)
    return step_change(trainable(model), before)


# The oracle: per-sample loss functions ℓ(f_i, y_i) in egn_fast's conventions, in plain torch.
ORACLE_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": lambda f, y: F.cross_entropy(f, y),
    "mse": lambda f, y: 0.5 * (f - y).square().sum(),
}


def oracle_loss_factor(case: Case) -> tuple[Tensor, Tensor]:
    """S (b, c, s) and w (b, s) with S_i S_iᵀ = Q_i and S_i w_i = r_i, in float64, independent of
    egn_fast: r_i = ∂ℓ_i/∂f_i and Q_i = ∂²ℓ_i/∂f_i² by autograd of ORACLE_LOSSES, Q_i = U Λ Uᵀ by
    eigh; S_i = U Λ^½ without the eigen-directions that are null for every sample (the softmax
    Hessian's all-ones vector), w_i = Λ^-½ Uᵀ r_i (0 where λ is 0)."""
    per_sample = ORACLE_LOSSES[case.loss]
    model = copy.deepcopy(case.model).double()
    with torch.no_grad():
        f = model(case.inputs.double()).reshape(case.inputs.shape[0], -1)
    y = case.targets.double().reshape(f.shape) if case.targets.is_floating_point() else case.targets
    r = torch.func.vmap(torch.func.grad(per_sample))(f, y)  # (b, c)
    Q = torch.func.vmap(torch.func.hessian(per_sample))(f, y)  # (b, c, c)
    evals, evecs = torch.linalg.eigh(Q)  # ascending
    tol = 1e-12 * float(evals.max())
    null = int((evals <= tol).all(0).sum())  # leading columns null for every sample
    evals, evecs = evals[:, null:], evecs[:, :, null:]
    root = evals.clamp_min(0).sqrt()
    w = torch.where(evals > tol, (evecs.mT @ r[..., None])[..., 0] / root.clamp_min(tol), 0.0)
    return evecs * root[:, None, :], w


def oracle_direction(case: Case, S: Tensor, w: Tensor) -> list[Tensor]:
    """The LM direction d = −(H + λI)⁻¹g, H = (1/b)JᵀQJ, g = (1/b)Jᵀr, in float64 from a
    materialized J̃ = SᵀJ (m = b·s rows; per-sample Jacobians by vmap of jacrev), through the
    identity d = −J̃ᵀ(J̃J̃ᵀ + bλI)⁻¹w (exact; the d × d system would not fit), Cholesky in float64.
    S, w from `oracle_loss_factor`."""
    model = copy.deepcopy(case.model).double()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    b, s = w.shape

    def rows(ps: dict[str, Tensor], x: Tensor, S_i: Tensor) -> Tensor:  # (s,): S_iᵀ f_i
        return S_i.T @ torch.func.functional_call(model, ps, (x[None],)).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(rows), in_dims=(None, 0, 0))(params, case.inputs.double(), S)
    J = torch.cat([jac[n].reshape(b * s, -1) for n in params], 1)  # (m, d), sample-major
    K = J @ J.T
    K.diagonal().add_(b * DAMPING)
    gamma = torch.cholesky_solve(w.reshape(-1, 1), torch.linalg.cholesky(K))
    d = -(J.T @ gamma).squeeze(1)
    return list(d.split([p.numel() for p in params.values()]))


def somax_missing() -> str | None:
    """None when somax (python-somax) and JAX import, else why not."""
    try:
        import jax  # noqa: F401
        import somax  # noqa: F401
    except Exception as err:  # ImportError, or a broken JAX install
        return f"somax: not installed, not measured ({type(err).__name__}: {err})"
    return None


def somax_version() -> str | None:
    """'python-somax X, jax Y' when both import, else None."""
    if somax_missing():
        return None
    import jax
    import somax

    return f"python-somax {somax.__version__}, jax {jax.__version__}"


def make_somax(case: Case) -> tuple[Callable[[], object], Callable[[], list[Tensor]]]:
    """The authors' library on the same network, weights and batch: `somax.egn_ce` (EGN for
    softmax cross-entropy, row-space Cholesky, λ = DAMPING, learning_rate 1, JAX on the CPU,
    float32). Returns (one jitted `method.step` from the initial weights, blocked until done;
    its direction θ' − θ as torch tensors in the model's parameter order).

    Its conventions match egn_fast's: mean loss, μ = bλ in the row space, update −lr·J̃ᵀu.
    Differences: somax factors Q_i + 1e-6·I (c rows per sample, m = b·c) and builds
    K by m JVP/VJP pairs. Only nn.Sequential of nn.Linear and nn.Tanh is translated.
    """
    import jax
    import jax.numpy as jnp
    import somax

    if case.loss != "cross_entropy":
        raise ValueError("make_somax: only cross_entropy is wired up")
    linears = [m for m in case.model if isinstance(m, nn.Linear)]
    if not all(isinstance(m, (nn.Linear, nn.Tanh)) for m in case.model):
        raise ValueError("make_somax: only nn.Sequential of nn.Linear and nn.Tanh is translated")
    params = {f"{i}": {"W": jnp.asarray(m.weight.detach().T.numpy()), "b": jnp.asarray(m.bias.detach().numpy())}
              for i, m in enumerate(linears)}

    def predict(ps: dict, x: jax.Array) -> jax.Array:  # (b, features) -> logits (b, c)
        for i in range(len(linears)):
            x = x @ ps[f"{i}"]["W"] + ps[f"{i}"]["b"]
            if i < len(linears) - 1:
                x = jnp.tanh(x)
        return x

    method = somax.egn_ce(predict_fn=predict, lam0=DAMPING, learning_rate=1.0)
    state = method.init(params)
    batch = {"x": jnp.asarray(case.inputs.numpy()), "y": jnp.asarray(case.targets.numpy().astype(np.int32))}
    step = jax.jit(lambda p, st, key: method.step(p, batch, st, key))
    key = jax.random.PRNGKey(SEED)

    def run() -> object:
        return jax.block_until_ready(step(params, state, key))

    def direction() -> list[Tensor]:
        new = run()[0]
        out = []
        for i in range(len(linears)):
            for name, transpose in (("W", True), ("b", False)):
                delta = torch.from_numpy(np.asarray(new[f"{i}"][name]) - np.asarray(params[f"{i}"][name]))
                out.append(delta.T.contiguous() if transpose else delta)
        return out  # weight, bias of each Linear: the model's parameter order

    return run, direction


# --------------------------------------------------------------------------- the sweep's methods by name


@dataclass
class Method:
    """A method of the sweep: `call` is what is timed; `direction` (None for SGD/Adam) gives its
    direction, like the parameters, for the oracle check."""

    call: Callable[[], object]
    direction: Callable[[], list[Tensor]] | None


def make_method(case: Case, name: str) -> Method:
    """The sweep's method `name` (one of step_time_sweep.SWEEP_METHODS) on this case."""
    if name == "egn":
        return Method(lambda: egn_direction(case), lambda: egn_direction(case))
    if name == "egn_step":
        return Method(make_egn_step(case), lambda: egn_step_direction(case))
    if name in FIRST_ORDER:
        return Method(make_optimizer_step(case, name), None)
    if name == "matJ":
        return Method(lambda: materialized_direction(case), lambda: materialized_direction(case))
    if name == "somax":
        return Method(*make_somax(case))
    raise ValueError(f"unknown method {name!r}")
