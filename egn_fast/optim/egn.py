r"""EGN as a `torch.optim.Optimizer` (the preconditioner form is egn_fast.optim.preconditioner).

Each step, at the current parameters w and for one mini-batch (docs/design.md §1):

    d      = −(H + λI)⁻¹ g                      exact LM direction, solved in the m×m row space
                                                (or −(H + λD)⁻¹g with metric="adam", egn_fast.system.metric)
    d̂      = momentum(d)                        "ema" | "heavy_ball" | "nesterov" (egn_fast.optim.momentum)
    s_g    = t · lr_g · d̂_g                     per parameter group g; t = 1 without line search
    w_g    ← (1 − lr_g · weight_decay_g) w_g + s_g      (decoupled weight decay)

- Line search (`line_search="armijo"`): t starts at min(growth · t_prev, 1) and shrinks ×shrink
  until L(w + s) ≤ L(w) + c₁ gᵀs, on the same batch (with one group: α = t·lr starts at
  min(1.5 α_prev, lr), the paper's rule). If no t passes in `max_tries`, the step is rejected.
- Adaptive damping (`adaptive_damping=True`): ρ = (L(w) − L(w + s)) / (predicted decrease of the
  LM model gᵀs + ½sᵀHs + ½λ‖s‖²); ρ < 0.25 → λ ×1.5, ρ > 0.75 → λ ×0.5, λ ∈ [1e-12, 1e6]. A step
  with ρ < 0 or a non-finite loss is rejected: parameters restored bit for bit, λ raised.
  When s is a multiple of d (no momentum, one lr), the prediction comes from row-space
  by-products; otherwise gᵀs uses g = (1/b)J̃ᵀw (one back-projection) and sᵀHs one JVP.
- A non-finite loss or Gram, or a solve that fails after its jitter retries, raises before
  anything is changed (or, with `skip_nonfinite=True`, warns and returns a rejected StepInfo).

Each concern is a plain function of egn_fast.optim.functional; the class keeps the state (λ, the
momentum buffers, the metric's second moment, the last step multiplier) and calls them in order.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Closure, Inputs, forward_of
from ..checks import check_damping, check_lr, finite_nonnegative, group_of, trainable
from ..distributed import DataParallel, resolve_distributed, unwrap
from ..dtensors import reshard_fsdp
from ..errors import NonFiniteError, SolveError
from ..losses import LossSpec, check_curvature
from ..system import RowSpaceSystem, build_system
from ..system.metric import adam_metric, check_metric
from .damping import AdaptiveDamping, resolve_adaptive_damping
from .functional import accept, apply_decay, apply_steps, lm_direction, lm_model, lm_steps, move_to, rollback
from .line_search import ArmijoLineSearch, resolve_line_search
from .model_optimizer import ModelOptimizer, ParamGroups
from .momentum import check_momentum, momentum_direction
from .step_info import StepInfo

__all__ = ["EGN", "StepInfo"]


class EGN(ModelOptimizer):
    """Exact Gauss-Newton (Levenberg–Marquardt in the row space) as a torch optimizer.

    Args:
        model: the network; the direction is taken with respect to the parameters in the param
            groups (default: all of `model.parameters()`); parameters with requires_grad=False
            are skipped.
        loss: "mse" (½‖f−y‖² per sample) | "cross_entropy" | "bce" | a `Loss` | a per-sample
            callable `fn(outputs (c,), target) -> scalar`. The batch loss is the mean over samples
            (per-token cross-entropy: over counted tokens, egn_fast.losses.cross_entropy).
        curvature: "exact" | "mc" (mc_samples rows per sample from targets drawn with
            `generator`; the default generator is seeded from torch's global RNG, rank 0's with a
            process group) | "empirical" (egn_fast.losses.curvature). The state_dict carries the
            generator's state, so a resumed run draws the same samples. With a process group a
            given generator must be in the same state on every rank (checked each step).
        metric: None (d = −(H + λI)⁻¹g) | "adam": d = −(H + λD)⁻¹g with D = √v̂ + metric_eps,
            v̂ the bias-corrected EMA (metric_beta) of g² (Adam's second moment, updated with
            every step's gradient; egn_fast.system.metric). Off the rows' span the step is then
            Adam's g/(λD) instead of g/λ: use it with curvature="mc"; λ acts as 1/Adam's lr. With a
            process group (exact mode) v is updated from the global gradient, the same on every rank.
        lr: step multiplier per group (1.0 is the full LM step).
        damping: initial λ ≥ 0 in (H + λI).
        momentum: β ∈ [0, 1) on the direction; momentum_type "ema" | "heavy_ball" | "nesterov".
        line_search: None | "armijo" | an `ArmijoLineSearch`.
        adaptive_damping: False | True | an `AdaptiveDamping`.
        weight_decay: decoupled weight decay per group.
        max_step_norm: if set, the step s is scaled down to this Euclidean norm.
        backend: op backend ("auto" | "torch" | "triton" | "cuda"); solve_dtype: dtype of the
            Cholesky (default the Gram's); seq_method: see `egn_fast.build_system`.
        skip_nonfinite: warn and skip (instead of raising) when the loss/Gram is non-finite or
            the solve fails.
        timings: record seconds per stage in StepInfo.timings.
        process_group: a torch.distributed group: each rank steps on its own shard of the batch
            (egn_fast.distributed); distributed: "exact" (default with a group: the direction of
            the concatenated batch) | "local" (the mean of the per-rank directions). Decisions
            (line search, damping) use the global loss, so every rank takes the same step. A model
            sharded with FSDP2's fully_shard (FSDP or HSDP) needs no group: the step runs over its
            mesh's ranks, each rank moving its own shards (egn_fast.distributed.sharded); the
            momentum and metric buffers are sharded like the parameters.
        params: torch-style param groups (an iterable of parameters or of dicts with "params"
            and per-group "lr"/"weight_decay"); all must belong to `model`.

    `step(inputs, targets)` or `step(closure=fn)` with fn() -> (outputs, targets) (called again to
    evaluate trial points) returns a `StepInfo`. The model must behave deterministically between
    those calls (e.g. dropout off) for the line search and ρ to be meaningful.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossSpec = "mse",
        lr: float = 1.0,
        damping: float = 1.0,
        momentum: float = 0.0,
        line_search: str | ArmijoLineSearch | None = None,
        adaptive_damping: bool | AdaptiveDamping = False,
        weight_decay: float = 0.0,
        backend: str = "auto",
        *,
        momentum_type: str = "ema",
        max_step_norm: float | None = None,
        solve_dtype: torch.dtype | None = None,
        seq_method: str = "auto",
        skip_nonfinite: bool = False,
        timings: bool = False,
        params: ParamGroups | None = None,
        process_group: Any = None,
        distributed: str | None = None,
        curvature: str = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        metric: str | None = None,
        metric_beta: float = 0.999,
        metric_eps: float = 1e-8,
    ) -> None:
        lr, damping, weight_decay = check_lr(lr), check_damping(damping), finite_nonnegative("weight_decay", weight_decay)
        check_curvature(curvature, mc_samples, generator, damping)
        check_momentum(momentum, momentum_type)
        check_metric(metric, metric_beta, metric_eps)
        if max_step_norm is not None and not max_step_norm > 0:
            raise ValueError(f"max_step_norm must be > 0, got {max_step_norm}")
        super().__init__(model, loss, params, dict(lr=lr, weight_decay=weight_decay))
        process_group, mode = resolve_distributed(unwrap(model), process_group, distributed)
        self.data_parallel = None if mode is None else DataParallel(process_group, mode, self.param_groups[0]["params"][0].device)
        if self.data_parallel is not None:
            self.data_parallel.check_replicated(list(model.parameters()))
        self.model = model if self.data_parallel is None else unwrap(model)
        self.momentum = momentum
        self.momentum_type = momentum_type
        self.line_search = resolve_line_search(line_search)
        self.adaptive_damping = resolve_adaptive_damping(adaptive_damping)
        self.max_step_norm = max_step_norm
        self.skip_nonfinite = skip_nonfinite
        self.backend, self.seq_method, self.solve_dtype, self.timings = backend, seq_method, solve_dtype, timings
        if metric is not None and self.data_parallel is not None and not self.data_parallel.exact:
            raise ValueError(
                f"metric={metric!r} with distributed='local' is not supported: each rank would update its second moment "
                "from its own gradient; use distributed='exact' (the global gradient, the same state on every rank)"
            )
        self.metric, self.metric_beta, self.metric_eps = metric, metric_beta, metric_eps
        self.curvature, self.mc_samples = curvature, mc_samples
        self.generator = generator
        if curvature == "mc" and generator is None:
            device = self.param_groups[0]["params"][0].device
            seed = int(torch.randint(2**62, ()))
            if self.data_parallel is not None:  # every rank draws the global batch's labels from one state
                seed = self.data_parallel.from_rank0(seed)
            self.generator = torch.Generator(device).manual_seed(seed)
        # Per-parameter state exists from the start, zeros where a first step reads "none yet" (the
        # same bits: β·0 + x = x): torch.distributed.checkpoint's state-dict helpers load into an
        # initialized state and would otherwise call step() without a batch to create one
        for p in trainable(self.param_groups):
            state = self.state[p]
            if momentum:
                state["momentum_buffer"] = torch.zeros_like(p)
            if metric is not None:
                state["metric_sq"] = torch.zeros_like(p)
        # Optimizer-wide state (per-parameter state holds the momentum buffers)
        self.egn_state: dict[str, Any] = dict(damping=damping, step_scale=1.0, steps=0, momentum_steps=0, metric_steps=0)

    @property
    def damping(self) -> float:
        """The λ the next step will use."""
        return self.egn_state["damping"]

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict; EGN's own state (λ, the step multiplier, the step
        counters, the generator's state) rides in the first param group under "egn", the part of
        an optimizer state dict that torch.distributed.checkpoint's helpers keep besides "state"."""
        sd = super().state_dict()
        egn = dict(self.egn_state)
        if self.generator is not None:
            egn["generator_state"] = self.generator.get_state()
        sd["param_groups"][0]["egn"] = egn
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") or [{}]
        if "egn" not in groups[0]:
            raise ValueError("not an EGN state_dict (its first param group has no 'egn' entry)")
        egn = dict(groups[0]["egn"])
        rng = egn.pop("generator_state", None)
        if rng is not None and self.generator is not None:
            self.generator.set_state(rng)
        self.egn_state.update(egn)
        super().load_state_dict(state_dict)
        self.param_groups[0].pop("egn")  # torch copied it into the live group

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, inputs: Inputs | None = None, targets: Tensor | None = None, *, closure: Closure | None = None
    ) -> StepInfo:
        """One EGN step on a mini-batch: (inputs, targets), or closure() -> (outputs, targets)."""
        if callable(inputs) and targets is None and closure is None:
            inputs, closure = None, inputs  # torch's positional step(closure), as Accelerate's optimizer wrapper calls it
        forward = forward_of(self.model, inputs, targets, closure)
        if self.data_parallel is None:
            return self._step(forward)
        with self.data_parallel.named_failures():  # a rank that died makes the others fail naming themselves
            return self._step(forward)

    def _step(self, forward: Closure) -> StepInfo:
        damping = self.egn_state["damping"]
        try:
            system = self._build_system(forward)
            scale = None
            if self.metric is not None:
                with system.clock("metric"):
                    scale = self._metric_scale(system.params, system.gradient())
            system, sol, d = lm_direction(system, damping, self.solve_dtype, scale)
        except (NonFiniteError, SolveError) as err:
            if not self.skip_nonfinite:
                raise
            warnings.warn(f"EGN step skipped: {err}", RuntimeWarning, stacklevel=2)
            return StepInfo(loss=math.nan, damping=damping, next_damping=damping, accepted=False, reason=str(err))
        params = system.params  # model.parameters() order, the order of d (groups may list them otherwise)
        self.egn_state["steps"] += 1
        info = StepInfo(
            loss=system.loss, damping=damping, next_damping=damping, accepted=False,
            direction_norm=math.sqrt(max(sol.dnorm2, 0.0)), jitter=sol.jitter, timings=system.timings,
        )

        old = [self.state[p].get("momentum_buffer") for p in params]
        d_hat, buffers = momentum_direction(d, old, self.momentum, self.momentum_type, self.egn_state["momentum_steps"])
        groups = group_of(self.param_groups)
        lrs = [groups[id(p)]["lr"] for p in params]
        decays = [groups[id(p)]["weight_decay"] for p in params]
        # s = a·d when there is no momentum and one lr: then the row-space by-products give gᵀs,
        # sᵀHs and ‖s‖² exactly without touching the model again
        multiple = d_hat is d and len(set(lrs)) == 1 and (self.data_parallel is None or self.data_parallel.exact)
        steps, a = lm_steps(d_hat, lrs, self.max_step_norm, multiple)
        if self.line_search is None and self.adaptive_damping is None:
            apply_steps(params, steps, lrs, decays)
            self._commit(params, buffers)
            info.accepted, info.step_size = True, lrs[0] if lrs else 0.0
            return info

        lm = lm_model(system, sol, steps, a, scale, forward if self.adaptive_damping is not None else None)
        saved = [p.detach().clone() for p in params]

        def loss_at(t: float) -> float:
            move_to(params, saved, steps, t)
            return self._loss_at(forward)

        verdict = accept(loss_at, system.loss, lm, damping, self.line_search, self.adaptive_damping, self.egn_state["step_scale"])
        info.loss_after, info.line_search_tries, info.rho, info.reason = verdict.loss_after, verdict.tries, verdict.rho, verdict.reason
        self.egn_state["damping"] = info.next_damping = verdict.next_damping
        if not verdict.accepted:
            rollback(params, saved)
            return info
        apply_decay(params, saved, lrs, decays)  # the accepted step is already added
        if self.line_search is not None:
            self.egn_state["step_scale"] = verdict.t
        self._commit(params, buffers)
        info.accepted, info.step_size = True, verdict.t * (lrs[0] if lrs else 0.0)
        return info

    def _build_system(self, forward: Closure) -> RowSpaceSystem:
        """This step's system: the data-parallel one with a process group. A metric builds the
        Gram of its own rows, so the system is then built without one."""
        build = build_system if self.data_parallel is None else self.data_parallel.build_system
        options: dict[str, Any] = dict(curvature=self.curvature, mc_samples=self.mc_samples, generator=self.generator)
        if self.metric is not None:
            options["gram"] = False
        return build(
            self.model, closure=forward, params=trainable(self.param_groups), loss=self.loss_fn, backend=self.backend,
            seq_method=self.seq_method, timings=self.timings, **options,
        )

    def _metric_scale(self, params: list[nn.Parameter], grad: list[Tensor]) -> list[Tensor]:
        """D^{-1/2} per parameter, Adam's second moment updated with this step's gradient."""
        self.egn_state["metric_steps"] += 1
        scale = []
        for p, g in zip(params, grad):
            v, c = adam_metric(self.state[p].get("metric_sq"), g, self.metric_beta, self.metric_eps, self.egn_state["metric_steps"])
            self.state[p]["metric_sq"] = v
            scale.append(c)
        return scale

    def _commit(self, params: list[nn.Parameter], buffers: list[Tensor] | None) -> None:
        if buffers is None:
            return
        for p, m in zip(params, buffers):
            self.state[p]["momentum_buffer"] = m
        self.egn_state["momentum_steps"] += 1

    def _loss_at(self, forward: Closure) -> float:
        if self.data_parallel is None:
            return float(self.loss_fn.batch_mean(*forward()))
        loss = self.data_parallel.loss_at(self.loss_fn, forward)
        # FSDP2 keeps the root's parameters unsharded after a forward; the step then moves the
        # sharded ones, and the next forward would not gather them again
        reshard_fsdp(self.model)
        return loss
