"""The generic rule: per-sample gradients by torch.func, for any module no specific rule covers
(custom modules, parameters used functionally by a parent module, subclasses that override a
registered forward). Exact for any per-sample computation, but it stores m·n numbers for the
module's n parameters and re-runs the module's forward per sample (vmapped).

The re-run takes sample i's slice of every argument that has samples (where: the plan's
`generic_in_dims`) and the whole of every other argument (masks, buffers, shared tensors). It
must reproduce the recorded outputs: a module that mixes samples or draws random numbers does
not, and is refused instead of giving wrong rows.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..capture.hooks import ModuleCall
from ..capture.layout import BatchDim, expand_shared, to_batch_first
from ..dtensors import full_value
from .factors import PerSampleFactors
from .registry import RuleContext

__all__ = ["generic_factors", "generic_in_dims", "per_sample_vjp"]

# At most this many assignments of batch dimensions to ambiguous arguments are tried.
_MAX_TRIALS = 64


def map_samples(fn: Callable[..., Any], *args: Any) -> Any:
    """torch.func.vmap(fn)(*args), or, where fn cannot run under vmap (nn.GRU and nn.LSTM have
    no batching rule, and their backward breaks under one), fn on each slice along dimension 0
    of args, the results stacked: the same values, one call per slice instead of one vmapped
    call. Random draws are refused, not looped (each slice would draw anew)."""
    try:
        return torch.func.vmap(fn)(*args)
    except RuntimeError as err:
        if "random" in str(err).lower():
            raise
    n = tree_flatten(args)[0][0].shape[0]
    per_slice = [fn(*tree_map(lambda a: a[i], args)) for i in range(n)]
    return tree_map(lambda *xs: torch.stack(xs), *per_slice)


def _sample_of_output(z: Tensor, layout: BatchDim, expanded: bool) -> Tensor:
    """One sample's output from a re-run on one sample: the batch of one removed (a folded
    dimension keeps its fold), or a shared output as each sample sees it once expanded."""
    if expanded:
        return z[0] if z.dim() and z.shape[0] == 1 else z
    return z.squeeze(layout.dim) if layout.fold == 1 else z


def _per_sample_forward(
    module: nn.Module, call: ModuleCall, in_dims: tuple[BatchDim | None, ...], b: int
) -> tuple[tuple[Tensor, ...], Callable[[dict, tuple], tuple[Tensor, ...]]]:
    """(the arguments with samples, batch-first; f(θ, sample i's slices) -> sample i's outputs)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    leaves = [x.detach() if isinstance(x, Tensor) else x for x in leaves]
    positions = [q for q, x in enumerate(leaves) if isinstance(x, Tensor)]
    batched = [(q, d) for q, d in zip(positions, in_dims) if d is not None]
    index, layouts, expanded = call.output_index, call.layouts, call.expanded

    def outputs(theta: dict, xs_i: tuple) -> tuple[Tensor, ...]:
        leaves_i = list(leaves)
        for (q, d), x_i in zip(batched, xs_i):
            leaves_i[q] = x_i.unsqueeze(d.dim) if d.fold == 1 else x_i  # a batch of one sample
        args_i, kwargs_i = tree_unflatten(leaves_i, spec)
        out = tree_flatten(torch.func.functional_call(module, theta, args_i, kwargs_i))[0]
        return tuple(_sample_of_output(out[q], layouts[j], j in expanded) for j, q in enumerate(index))

    return tuple(to_batch_first(leaves[q], d, b) for q, d in batched), outputs


def per_sample_vjp(
    outputs: Callable[[dict, Any], tuple[Tensor, ...]], theta: dict[str, Tensor], xs: Any, cot: tuple[Tensor, ...]
) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Rows and outputs of a per-sample function: outputs(θ, xs_i) -> sample i's outputs, xs with
    the samples on dimension 0, cot the output-gradients (b, s, …). Returns ({name: (b, s,
    *θ[name].shape)}, the per-sample outputs stacked (b, …)), one vjp per sample vmapped over the
    batch and the s cotangents (`map_samples`); the outputs come free with the vjp (for reproduction
    checks)."""

    def one_sample(xs_i: Any, cot_i: tuple[Tensor, ...]) -> tuple[dict, tuple[Tensor, ...]]:
        out, vjp_fn = torch.func.vjp(lambda th: outputs(th, xs_i), theta)
        return map_samples(vjp_fn, cot_i)[0], out

    return map_samples(one_sample, xs, cot)


def _recorded(call: ModuleCall, b: int) -> tuple[Tensor, ...]:
    """The recorded outputs, batch-first (b, …)."""
    return tuple(
        expand_shared(z.detach(), b) if j in call.rowwise
        else z.detach() if j in call.expanded
        else to_batch_first(z.detach(), call.layouts[j], b)
        for j, z in enumerate(call.outputs)
    )


def _reproduces(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> bool:
    """Outputs equal up to rounding (per-sample and batched kernels may sum in another order)."""
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False
        tol = 1e-9 if w.dtype == torch.float64 else 1e-4
        if float((g.detach() - w).norm()) > tol * max(float(w.norm()), 1e-30):
            return False
    return True


def _candidates(x: Tensor, probed: BatchDim | None, b: int, first_dim: int) -> list[BatchDim | None]:
    """Where the samples may lie in an argument: the probe's answer for a differentiable one; else
    every dimension of size b (the output's batch dimension first), folded ones, or none."""
    if x.requires_grad or x.dim() == 0:
        return [probed if x.requires_grad else None]
    plain = sorted((k for k, n in enumerate(x.shape) if n == b), key=lambda k: k != first_dim)
    folded = [k for k, n in enumerate(x.shape) if n != b and n % b == 0]
    return [BatchDim(k) for k in plain] + [BatchDim(k, x.shape[k] // b) for k in folded] + [None]


def generic_in_dims(
    module: nn.Module,
    call: ModuleCall,
    params: dict[str, nn.Parameter],
    b: int,
    name: str,
    probed: list[BatchDim | None],
) -> tuple[BatchDim | None, ...]:
    """The batch layout of each tensor argument of `call` (None: whole, the same for every sample).

    Differentiable arguments take the probe's layout; for the others (inputs, masks, indices),
    every candidate assignment is tried with a per-sample forward until one reproduces the
    recorded outputs — e.g. a (T, T) attention mask when T = b is not sliced. One argument passed
    several times gets one decision.
    """
    first_dim = call.layouts[0].dim if call.layouts else 0
    distinct: dict[int, list[BatchDim | None]] = {}
    for x, d in zip(call.inputs, probed):
        distinct.setdefault(id(x), _candidates(x, d, b, first_dim))
    keys = list(distinct)
    choices = list(itertools.islice(itertools.product(*distinct.values()), _MAX_TRIALS))
    if len(choices) == 1:
        return tuple(choices[0][keys.index(id(x))] for x in call.inputs)  # checked at every step
    theta = {n: full_value(p) for n, p in params.items()}
    want = _recorded(call, b)
    for choice in choices:
        in_dims = tuple(choice[keys.index(id(x))] for x in call.inputs)
        try:
            xs, outputs = _per_sample_forward(module, call, in_dims, b)
            if xs:
                got = map_samples(lambda xs_i: outputs(theta, xs_i), xs)
            else:  # no argument has samples: every sample sees the same outputs
                got = tuple(o.expand(b, *o.shape) for o in outputs(theta, ()))
        except Exception as err:  # this assignment does not even run: try the next one
            if "random" in str(err).lower():
                raise _rerun_error(name, module, err) from err
            continue
        if _reproduces(got, want):
            return in_dims
    raise ValueError(
        f"module {name!r} ({type(module).__name__}) is handled by per-sample gradients (torch.func), and no "
        "way of slicing its arguments per sample reproduces its recorded outputs: it mixes samples (batch "
        "statistics, a reduction over the batch) or draws random numbers; put it in eval mode, make it "
        "per-sample, or register a rule for it (egn_fast.register_rule)"
    )


def generic_factors(
    module: nn.Module,
    calls: list[ModuleCall],
    ctx: RuleContext,
    params: dict[str, nn.Parameter],
    in_dims: list[tuple[BatchDim | None, ...] | None],
) -> PerSampleFactors | None:
    """Per-sample gradients of `module`'s outputs w.r.t. `params` (names relative to `module`),
    contracted with the recorded output-gradients: P_ik = Σ_calls ∂(G_ik · z_i)/∂θ, by torch.func
    (vjp per sample, vmapped over the batch and the s cotangents). Other parameters are constants.
    in_dims: per call, the batch layout of each tensor argument (`generic_in_dims`), or None for a
    call whose outputs did not reach the probed samples (then its gradients must be zero)."""
    b, s = ctx.b, ctx.s
    theta = {n: full_value(p) for n, p in params.items()}  # a sharded parameter all-gathered, for this module only
    total: dict[str, Tensor] = {}
    for call, dims in zip(calls, in_dims):
        if all(g is None or not g.any() for g in call.grads):
            continue  # no row of this call is non-zero
        if dims is None:
            raise ValueError(
                f"module {ctx.name!r} ({type(module).__name__}): its outputs did not move the probed samples' "
                "outputs when the plan was made, but carry gradient now; egn_fast cannot tell where its "
                "samples lie (please report this model)"
            )
        want = _recorded(call, b)
        cot = tuple(g if g is not None else torch.zeros(b, s, *z.shape[1:], dtype=z.dtype, device=z.device) for g, z in zip(call.grads, want))
        xs, outputs = _per_sample_forward(module, call, dims, b)
        try:
            grads, got = per_sample_vjp(outputs, theta, xs, cot)
        except RuntimeError as err:
            raise _rerun_error(ctx.name, module, err) from err
        if not _reproduces(got, want):
            raise ValueError(
                f"module {ctx.name!r} ({type(module).__name__}): its per-sample re-run (torch.func) no longer "
                "reproduces its recorded outputs — it mixes samples or draws random numbers (dropout?); put it "
                "in eval mode or make it per-sample"
            )
        for n, g in grads.items():
            total[n] = total[n] + g if n in total else g
    if not total:
        return None
    return PerSampleFactors([params[n] for n in total], list(total.values()))


def _rerun_error(name: str, module: nn.Module, err: Exception) -> RuntimeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "random" in first.lower():
        return RuntimeError(
            f"module {name!r} ({type(module).__name__}) is handled by per-sample gradients (torch.func) and "
            "draws random numbers in forward (dropout?): put the model in eval mode or remove the randomness"
        )
    return RuntimeError(
        f"module {name!r} ({type(module).__name__}) is handled by per-sample gradients (torch.func), and "
        f"its per-sample re-run failed: {first}. Register a rule for it (egn_fast.register_rule)"
    )
