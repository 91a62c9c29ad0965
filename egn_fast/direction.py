"""The EGN direction, stage by stage:

    capture (forward with hooks) → loss head (r, S, w) → batched backward (G) → Gram K
    → damped solve (K + bλI) γ = w → back-projection d = −J̃ᵀγ

`build_system` runs the first four stages and returns a `RowSpaceSystem` (K, w and the layer
factors); its `solve` and `backproject` run the last two, so several λ can be tried on one
capture. `direction` and `direction_with_info` do all of it. `row_jvp` is the other product,
J̃v, for matrix-free methods (and curvature checks) that need Hv = (1/b)J̃ᵀ(J̃v).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .capture import Capture, ModuleCall, output_grads, params_reached_outside
from .layers import Factors, RuleContext, generic_factors, merge_shared, rule_for
from .losses import Loss, LossHead, resolve_loss
from .ops import Backend, get_backend
from .solve import EigenSolver, damped_solve

__all__ = [
    "RowSpaceSystem",
    "Solution",
    "DirectionResult",
    "NonFiniteError",
    "build_system",
    "row_jvp",
    "row_jvp_fn",
    "direction",
    "direction_with_info",
]

Inputs = Tensor | tuple | list | dict


class NonFiniteError(ValueError):
    """The model's outputs, the loss or the Gram hold nan/inf at the current parameters."""


@dataclass
class Solution:
    """The damped solve and its row-space by-products (DESIGN §1), all without touching J.

    gamma (m,): (K + bλI)γ = w.  With d = −J̃ᵀγ, g = (1/b)J̃ᵀw, H = (1/b)J̃ᵀJ̃:
    gtd = gᵀd = −(1/b)wᵀKγ,  dHd = dᵀHd = (1/b)‖Kγ‖²,  dnorm2 = ‖d‖² = γᵀKγ,
    predicted_decrease = −(gᵀd + ½dᵀHd + ½λ‖d‖²) (decrease of the LM model along d).
    """

    damping: float
    gamma: Tensor
    jitter: float
    gtd: float
    dHd: float
    dnorm2: float

    @property
    def predicted_decrease(self) -> float:
        return -(self.gtd + 0.5 * self.dHd + 0.5 * self.damping * self.dnorm2)


@dataclass
class RowSpaceSystem:
    """Everything the solve and back-projection need, after one capture.

    K (m, m) symmetric Gram J̃J̃ᵀ in fp32/fp64 (None when built with gram=False: then only
    `backproject` works); w (m,); head: the loss head at the current parameters; factors:
    per-layer factors; params: the trainable parameters in model.parameters() order.
    """

    params: list[nn.Parameter]
    K: Tensor | None
    w: Tensor
    b: int
    s: int
    head: LossHead
    factors: list[Factors]
    backend: Backend
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The batch loss L(w) at the parameters the system was built at."""
        return float(self.head.value)

    def _gram(self) -> Tensor:
        if self.K is None:
            raise ValueError("this system was built with gram=False; build it with gram=True to solve")
        return self.K

    def solve(self, damping: float, solve_dtype: torch.dtype | None = None) -> Solution:
        """γ for damping λ ≥ 0 (Cholesky with jitter retry), with its by-products."""
        if not damping >= 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}")
        res = damped_solve(self._gram(), self.w, self.b * damping, self.backend, solve_dtype)
        return self._solution(damping, res.gamma, res.jitter)

    def eigen(self, solve_dtype: torch.dtype | None = None) -> EigenSolver:
        """K = VΛVᵀ once; then `solve_eigen(eig, λ)` costs O(m²) per λ."""
        return EigenSolver(self._gram(), solve_dtype, self.backend)

    def solve_eigen(self, eig: EigenSolver, damping: float) -> Solution:
        """γ for damping λ > 0 from a precomputed eigendecomposition of K."""
        return self._solution(damping, eig.solve(self.w, self.b * damping), 0.0)

    def _solution(self, damping: float, gamma: Tensor, jitter: float) -> Solution:
        Kg = self._gram() @ gamma
        b = self.b
        return Solution(
            damping=damping,
            gamma=gamma,
            jitter=jitter,
            gtd=float(-(self.w @ Kg) / b),
            dHd=float(Kg @ Kg / b),
            dnorm2=float(gamma @ Kg),
        )

    def backproject(self, gamma: Tensor) -> list[Tensor]:
        """d = −J̃ᵀγ, one tensor per trainable parameter (shape, dtype and device of the parameter)."""
        u = -gamma.view(self.b, self.s)
        out: dict[int, Tensor] = {}
        for f in self.factors:
            for p, d in zip(f.params, f.backproject(u, self.backend)):
                out[id(p)] = d
        return [out[id(p)].to(p.dtype) if id(p) in out else torch.zeros_like(p) for p in self.params]


def _check_model(model: nn.Module, only: set[int] | None = None) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """The trainable parameters (model.parameters() order; restricted to the ids in `only` when
    given), the modules that contain any (the ones to hook, tied holders included), and the checks
    that must pass before the model runs."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.named_modules())  # one traversal serves everything below
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    holders: set[str] = set()
    for name, m in modules:
        for p in m._parameters.values():
            if p is not None and p.requires_grad and (only is None or id(p) in only):
                holders.add(name)
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}) normalizes with batch "
                "statistics, which mixes samples, so per-sample Jacobians are undefined: call "
                "model.eval() for that module (running statistics) or use GroupNorm/LayerNorm"
            )
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError(
                f"module {name!r} (Embedding with max_norm) rescales its weight in place during "
                "forward; egn_fast leaves the model untouched, so max_norm is not supported"
            )
    if only is not None:
        missing = only - {id(p) for _, m in modules for p in m._parameters.values() if p is not None}
        if missing:
            raise ValueError(f"{len(missing)} of the given parameters are not parameters of the model")
    if not params:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters (requires_grad=True)")
    prefixes = {h[:i] for h in holders for i in [len(h)] + [j for j, ch in enumerate(h) if ch == "."]}
    return params, [m for name, m in modules if not name or name in prefixes]


def _check_inputs(inputs: Inputs, device: torch.device) -> None:
    for x in tree_flatten(inputs)[0]:
        if isinstance(x, Tensor) and x.device != device:
            raise ValueError(f"inputs are on {x.device} but the model's parameters are on {device}")


def _call_model(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@dataclass
class _Plan:
    """Which rule handles which module, decided after a forward pass."""

    specific: list[tuple[str, nn.Module, Callable[..., Factors | None]]]
    generic: list[tuple[str, nn.Module, dict[str, nn.Parameter]]]

    def modules(self) -> list[nn.Module]:
        return [m for _, m, _ in self.specific] + [m for _, m, _ in self.generic]


# Plans per model, keyed by which modules were called how often: the graph walk runs once.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Plan]]" = weakref.WeakKeyDictionary()


def _plan_for(model: nn.Module, capture: Capture, f: Tensor, trainable: set[int]) -> _Plan:
    key = (tuple((id(m), len(c)) for m, c in capture.calls.items()), tuple(sorted(trainable)))
    cache = _PLANS.setdefault(model, {})
    plan = cache.get(key)
    # ids can be reused by a module that replaced a freed one: the plan must name these modules
    if plan is None or not all(m in capture.calls for m in plan.modules()):
        plan = cache[key] = _make_plan(model, capture, f, trainable)
    return plan


def _make_plan(model: nn.Module, capture: Capture, f: Tensor, trainable: set[int]) -> _Plan:
    """Assign every trainable parameter that reaches the loss to a rule.

    A called module with a specific rule covers its own parameters. Every other parameter the
    autograd graph reaches (custom modules, modules used functionally by a parent, parameters
    of modules that were never called themselves) goes to the generic rule of the innermost
    called module that contains its owner.
    """
    names = {m: n for n, m in model.named_modules()}
    parents: dict[nn.Module, nn.Module] = {}
    for m in model.modules():
        for child in m.children():
            parents.setdefault(child, m)
    specific, covered = [], set()
    for m, calls in capture.calls.items():
        rule = rule_for(m)
        own = [p for p in m.parameters(recurse=False) if id(p) in trainable]
        if rule is not None and own:
            specific.append((names[m], m, rule))
            covered.update(id(p) for p in own)
    regions = [c for _, m, _ in specific for c in capture.calls[m]]
    reached = params_reached_outside(f, regions)
    generic: dict[nn.Module, dict[str, nn.Parameter]] = {}
    for owner in model.modules():
        for pname, p in owner.named_parameters(recurse=False):
            if id(p) not in trainable or id(p) not in reached:
                continue
            if id(p) in covered:
                raise ValueError(
                    f"parameter {(names[owner] + '.' if names[owner] else '') + pname!r} is used outside "
                    f"the forward of its module {names[owner]!r} (e.g. a functional call on a tied "
                    "weight); egn_fast cannot attribute that use to a layer rule"
                )
            host, path = owner, [pname]
            while host not in capture.calls:
                path.insert(0, names[host].rsplit(".", 1)[-1])
                host = parents[host]
            generic.setdefault(host, {})[".".join(path)] = p
    return _Plan(specific, [(names[m], m, ps) for m, ps in generic.items()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Closure = Callable[[], tuple[Tensor, Tensor]]


def forward_of(model: nn.Module, inputs: Inputs | None, targets: Tensor | None, closure: Closure | None) -> Closure:
    """One way to run the model: `closure() -> (outputs, targets)`, or (inputs, targets) wrapped as one."""
    if closure is not None:
        if inputs is not None or targets is not None:
            raise ValueError("pass either (inputs, targets) or closure=, not both")

        def checked() -> tuple[Tensor, Tensor]:
            res = closure()
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise ValueError(f"closure() must return (outputs, targets), got {type(res).__name__}")
            return res[0], res[1]

        return checked
    if inputs is None or targets is None:
        raise ValueError("pass (inputs, targets), or closure= returning (outputs, targets)")
    return lambda: (_call_model(model, inputs), targets)


def build_system(
    model: nn.Module,
    inputs: Inputs | None = None,
    targets: Tensor | None = None,
    *,
    closure: Closure | None = None,
    params: list[nn.Parameter] | None = None,
    loss: str | Loss | Callable[[Tensor, Tensor], Tensor] = "mse",
    backend: str = "auto",
    seq_method: str = "auto",
    timings: bool = False,
    gram: bool = True,
) -> RowSpaceSystem:
    """Capture, loss head, batched backward and Gram: the row-space system at the current parameters.

    inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments); the model's
    output is (b, …), flattened to (b, c). targets as the loss expects (see `egn_fast.losses`).
    Instead of (inputs, targets), `closure()` may run the model itself and return (outputs, targets).
    params: the parameters J is taken with respect to (default: all with requires_grad); the rest
    of the model is held fixed.
    seq_method: "auto" (cost model per layer) | "ghost" | "per_sample" for sequence layers.
    gram=False stops after the layer factors (K is None): for callers that only need J̃ᵀu
    (`backproject`) and J̃v (`row_jvp`), it saves the Σ_l (m²·out_l + b²·in_l) Gram work and the
    m×m memory. Non-finite factors are then not detected here (the Gram's diagonal is the check).
    The model's parameters, buffers and .grad fields are left untouched.
    """
    forward = forward_of(model, inputs, targets, closure)
    params, hooked = _check_model(model, None if params is None else {id(p) for p in params})
    loss_fn = resolve_loss(loss)
    device = params[0].device
    if any(p.device != device for p in params):
        raise ValueError("the model's trainable parameters lie on several devices; egn_fast needs one")
    ops = get_backend(backend, device)
    if seq_method not in ("auto", "ghost", "per_sample"):
        raise ValueError(f"unknown seq_method {seq_method!r}; expected 'auto', 'ghost' or 'per_sample'")
    if inputs is not None:
        _check_inputs(inputs, device)
    acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    trainable = {id(p) for p in params}
    clock: dict[str, float] = {}
    t0 = time.perf_counter()

    for attempt in range(2):
        with torch.enable_grad(), Capture(hooked) as capture:
            out, targets = forward()
            # under the caller's no_grad (an optimizer step) a view made later would lose its grad_fn
            f_flat = out.reshape(out.shape[0], -1) if isinstance(out, Tensor) and out.dim() else out
        if not isinstance(out, Tensor):
            raise ValueError(f"the model must return a tensor (b, …), got {type(out).__name__}")
        if out.dim() == 0:
            raise ValueError("the model returned a scalar; egn_fast needs per-sample outputs (b, …)")
        b = out.shape[0]
        if not torch.isfinite(f_flat).all():
            raise NonFiniteError("the model's outputs contain non-finite values (nan/inf)")
        if not f_flat.requires_grad:
            raise ValueError("the model's outputs do not depend on any trainable parameter")
        plan = _plan_for(model, capture, out, trainable)
        # A model that edits a recorded tensor in place (ReLU(inplace=True) after a layer, x += …)
        # would corrupt our factors: remember those modules and capture again with copies.
        if not capture.stale_modules(plan.modules()):
            break
    else:
        raise RuntimeError("recorded layer inputs/outputs are still modified in place after copying them")
    _sync(device)
    clock["forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets = loss_fn.check_targets(f_flat, targets)
    head = loss_fn.head(f_flat.detach(), targets, ops)
    if not torch.isfinite(head.per_sample).all():
        raise NonFiniteError(f"the loss ({loss_fn.name}) is not finite at the current parameters")
    s = head.S.shape[2]
    clock["loss_head"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calls: list[ModuleCall] = [c for m in plan.modules() for c in capture.calls[m]]
    output_grads(f_flat, head.S.permute(2, 0, 1).to(f_flat.dtype), calls)
    del out, f_flat
    _sync(device)
    clock["backward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():  # torch.func transforms in the generic rule still differentiate
        K, factors = _gram(plan, capture, b, s, acc_dtype, seq_method, ops, device, gram)
    # A nan/inf anywhere in the factors shows on the diagonal (|K_ij|² ≤ K_ii K_jj): O(m) check.
    if K is not None and not torch.isfinite(K.diagonal().sum()):
        raise NonFiniteError("the Gram has non-finite entries: some layer input or output-gradient is nan/inf")
    _sync(device)
    clock["gram"] = time.perf_counter() - t0
    w = head.w.reshape(-1).to(acc_dtype)
    return RowSpaceSystem(params, K, w, b, s, head, factors, ops, clock if timings else {})


def _gram(
    plan: _Plan, capture: Capture, b: int, s: int, acc_dtype: torch.dtype, seq_method: str, ops: Backend,
    device: torch.device, gram: bool = True,
) -> tuple[Tensor | None, list[Factors]]:
    """Layer factors from the captured calls, and K = Σ_layers J̃_l J̃_lᵀ (m, m), symmetric
    (None when gram=False)."""
    factors: list[Factors] = []
    for name, m, rule in plan.specific:
        f = rule(m, capture.calls[m], RuleContext(name, b, s, acc_dtype, seq_method))
        if f is not None:
            factors.append(f)
    for name, m, ps in plan.generic:
        f = generic_factors(m, capture.calls[m], RuleContext(name, b, s, acc_dtype, seq_method), ps)
        if f is not None:
            factors.append(f)
    capture.calls.clear()
    factors = merge_shared(factors, acc_dtype)
    if not gram:
        return None, factors
    K = torch.zeros(b * s, b * s, dtype=acc_dtype, device=device)
    for f in factors:
        f.add_gram(K, ops)
    return K, factors


def row_jvp_fn(system: RowSpaceSystem, forward: Closure) -> Callable[[list[Tensor]], Tensor]:
    """Linearize the model once at the current parameters; return v ↦ J̃v (see `row_jvp`).

    Runs `forward` once and one reverse pass with create_graph=True; each call of the returned
    function is then one more reverse pass (through the first one), so an iterative method pays
    the forward only once. The graph is kept alive by the returned function: drop it when done.
    The parameters must not change while it is in use.
    """
    with torch.enable_grad():  # callers are usually optimizer steps under no_grad
        out, _ = forward()
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != system.b:
            raise ValueError(f"forward() must return outputs of batch size {system.b}, as when the system was built")
        f = out.reshape(out.shape[0], -1)
        if f.shape[1] != system.head.S.shape[1]:
            raise ValueError(f"forward() returned {f.shape[1]} outputs per sample; the system has {system.head.S.shape[1]}")
        # Jᵀu is linear in u, so ∂/∂u ⟨Jᵀu, v⟩ = Jv at any u: u = 0 is as good as any and keeps
        # the values out of the graph. Unused parameters get None (their columns of J are 0).
        u = torch.zeros_like(f, requires_grad=True)
        JTu = torch.autograd.grad(f, system.params, u, create_graph=True, allow_unused=True)
    S = system.head.S  # (b, c, s)

    def jvp(steps: list[Tensor]) -> Tensor:
        if len(steps) != len(system.params):
            raise ValueError(f"expected {len(system.params)} tensors shaped like system.params, got {len(steps)}")
        with torch.enable_grad():
            inner = sum(((g * v).sum() for g, v in zip(JTu, steps) if g is not None and g.requires_grad), f.new_zeros(()))
            # retain_graph: the graph of JᵀU is reused by every call
            (Jv,) = torch.autograd.grad(inner, u, retain_graph=True, allow_unused=True) if inner.requires_grad else (None,)
        if Jv is None:  # no trainable parameter reaches the outputs through a u-dependent path
            Jv = torch.zeros_like(f)
        return torch.einsum("bcs,bc->bs", S.to(Jv.dtype), Jv.detach())

    return jvp


def row_jvp(system: RowSpaceSystem, forward: Closure, steps: list[Tensor]) -> Tensor:
    """J̃v: the rows of `system` applied to a parameter-space vector v, at the current parameters.

    system: from `build_system` (gram=False is enough); forward: `closure() -> (outputs,
    targets)` that runs the model on the same batch (e.g. `forward_of(model, inputs, targets,
    None)`); steps: v, one tensor per parameter of `system.params`, with its shape.
    Returns (b, s): entry (i, k) = S_{i,:,k}ᵀ (J v)_i, so ‖J̃v‖²/b = vᵀHv and
    (1/b)J̃ᵀ(J̃v) = Hv (J̃ᵀu is `system.backproject(-u.reshape(-1))`). Dtype of the outputs.

    J v is computed as ∂/∂u ⟨Jᵀu, v⟩ with two reverse passes, so it works for any model the
    closure can run (no forward-mode support needed). For many products at one point use
    `row_jvp_fn`, which runs the forward once.
    """
    return row_jvp_fn(system, forward)(steps)


@dataclass
class DirectionResult:
    """`direction_with_info`'s answer: the direction, the loss, the solve and its by-products."""

    direction: list[Tensor]
    loss: float
    solution: Solution
    m: int
    timings: dict[str, float]


def direction_with_info(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    loss: str | Loss | Callable[[Tensor, Tensor], Tensor] = "mse",
    damping: float = 1.0,
    backend: str = "auto",
    solve_dtype: torch.dtype | None = None,
    seq_method: str = "auto",
    timings: bool = False,
) -> DirectionResult:
    """Like `direction`, plus the loss, γ, jitter, gᵀd, dᵀHd, ‖d‖², the predicted decrease and
    (with timings=True) seconds per stage."""
    system = build_system(model, inputs, targets, loss=loss, backend=backend, seq_method=seq_method, timings=timings)
    device = system.w.device
    t0 = time.perf_counter()
    sol = system.solve(damping, solve_dtype)
    _sync(device)
    t1 = time.perf_counter()
    d = system.backproject(sol.gamma)
    _sync(device)
    if timings:
        system.timings["solve"] = t1 - t0
        system.timings["backproject"] = time.perf_counter() - t1
    return DirectionResult(d, system.loss, sol, system.w.shape[0], system.timings)


def direction(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    loss: str | Loss | Callable[[Tensor, Tensor], Tensor] = "mse",
    damping: float = 1.0,
    backend: str = "auto",
    solve_dtype: torch.dtype | None = None,
    seq_method: str = "auto",
) -> list[Tensor]:
    """The exact Levenberg–Marquardt / EGN direction d = −(H + λI)⁻¹g for one mini-batch.

    H = (1/b)JᵀQJ is the Gauss-Newton matrix and g = (1/b)Jᵀr the gradient of the batch-mean
    loss; λ = `damping`. Computed as d = −J̃ᵀ(K + bλI)⁻¹w in the m×m row space (m = b·s),
    from per-layer activations and output-gradients, never materializing J.

    Returns one tensor per trainable parameter, in model.parameters() order, with the
    parameter's shape, dtype and device: apply it as `p += lr * d`.
    """
    return direction_with_info(
        model, inputs, targets, loss=loss, damping=damping, backend=backend, solve_dtype=solve_dtype, seq_method=seq_method
    ).direction
