"""Per-module rules (DESIGN §2): each turns a module's recorded calls into `Factors`, its share
of J̃ kept as activations and output-gradients, which can add its Gram contribution to K and
back-project a row-space vector u to J̃ᵀu for the module's parameters.

| module                          | factors                      | Gram op                  |
|---------------------------------|------------------------------|--------------------------|
| Linear on (b, in)               | A (b, in), G (b, s, out)     | gram_dense               |
| Linear on (b, *, in), Conv1d/2d | A (b, T, in), G (b, s, T, out) | gram_seq (ghost) or per-sample |
| Embedding                       | tokens (b, T), G             | gram_embedding           |
| LayerNorm/RMSNorm/GroupNorm/BatchNorm(eval) | per-sample grads P (b, s, n) | gram_per_sample |
| any other module owning params  | per-sample grads by torch.func | gram_per_sample        |

A module called several times (tied weights) concatenates its calls along T.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .capture import ModuleCall
from .ops import Backend
from .ops.torch_backend import per_sample_seq

__all__ = [
    "Factors",
    "SeqFactors",
    "EmbeddingFactors",
    "PerSampleFactors",
    "rule_for",
    "generic_factors",
    "merge_shared",
    "choose_seq_method",
    "RuleContext",
]

# The per-sample method is not chosen when its m·out·in per-sample gradients exceed this
# many elements (1 GiB of fp32).
_PER_SAMPLE_MAX_ELEMENTS = 1 << 28


class Factors:
    """A layer's share of J̃ (rows sample-major, m = b·s), kept as factors.

    params: the parameters these rows cover (trainable ones only).
    """

    params: list[nn.Parameter]

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        """K (m, m) lower triangle += this layer's J̃_l J̃_lᵀ."""
        raise NotImplementedError

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        """J̃_lᵀu for u (b, s): one tensor per parameter, in u's dtype."""
        raise NotImplementedError

    def per_sample_grads(self, dtype: torch.dtype) -> list[Tensor]:
        """Rows of J̃_l per parameter: (b, s, *param.shape)."""
        raise NotImplementedError


@lru_cache(maxsize=4096)
def choose_seq_method(b: int, s: int, T: int, n_in: int, n_out: int) -> str:
    """"ghost" or "per_sample" for a layer applied at T positions, by multiply-add count
    (both are GEMM-bound; memory decides only when per-sample gradients would not fit).

    ghost:      m²T²·out + b²T²·in     (no per-sample gradient stored)
    per_sample: m·T·out·in + m²·out·in (stores m·out·in numbers)
    """
    m = b * s
    ghost = m * m * T * T * n_out + b * b * T * T * n_in
    per_sample = m * T * n_out * n_in + m * m * n_out * n_in
    if m * n_out * n_in > _PER_SAMPLE_MAX_ELEMENTS:
        return "ghost"
    return "ghost" if ghost <= per_sample else "per_sample"


class SeqFactors(Factors):
    """Linear / convolution factors, one (A, G) pair per group.

    A: (b, T, in_g) inputs (unfolded patches for a convolution), G: (b, s, T, out_g).
    T = 1 is the dense case. weight/bias are None when frozen.
    """

    def __init__(
        self,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
        groups: list[tuple[Tensor, Tensor]],
        seq_method: str = "auto",
    ):
        self.weight, self.bias, self.groups = weight, bias, groups
        self.params = [p for p in (weight, bias) if p is not None]
        self.seq_method = seq_method

    def method(self) -> str:
        A, G = self.groups[0]
        b, s, T, n_out = G.shape
        if T == 1:
            return "dense"
        if self.seq_method != "auto":
            return self.seq_method
        return choose_seq_method(b, s, T, A.shape[2], n_out)

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        method = self.method()
        has_bias = self.bias is not None
        for A, G in self.groups:
            if self.weight is None:
                backend.gram_per_sample(K, G.sum(2))
            elif method == "dense":
                backend.gram_dense(K, A[:, 0], G[:, :, 0], has_bias)
            elif method == "ghost":
                backend.gram_seq(K, A, G, has_bias)
            elif method == "per_sample":
                backend.gram_per_sample(K, per_sample_seq(A, G, K.dtype).flatten(2))
                if has_bias:  # a Gram of its own: cheaper than concatenating to P
                    backend.gram_per_sample(K, G.sum(2))
            else:
                raise ValueError(f"unknown sequence method {method!r}; expected 'auto', 'ghost' or 'per_sample'")

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        parts = [backend.backproject(A, G, u, self.bias is not None) for A, G in self.groups]
        out = []
        if self.weight is not None:
            out.append(_cat([dW for dW, _ in parts], 0).view(self.weight.shape))
        if self.bias is not None:
            out.append(_cat([db for _, db in parts], 0))
        return out

    def per_sample_grads(self, dtype: torch.dtype) -> list[Tensor]:
        b, s = self.groups[0][1].shape[:2]
        out = []
        if self.weight is not None:
            P = _cat([per_sample_seq(A, G, dtype).flatten(3) for A, G in self.groups], 2)
            out.append(P.view(b, s, *self.weight.shape))
        if self.bias is not None:
            out.append(_cat([G.to(dtype).sum(2) for _, G in self.groups], 2))
        return out


class EmbeddingFactors(Factors):
    """tokens (b, T) and G (b, s, T, dim), with the rows of padding tokens zeroed."""

    def __init__(self, weight: nn.Parameter, tokens: Tensor, G: Tensor):
        self.weight, self.tokens, self.G = weight, tokens, G
        self.params = [weight]

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        backend.gram_embedding(K, self.tokens, self.G)

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        return [backend.backproject_embedding(self.tokens, self.G, u, self.weight.shape[0])]

    def per_sample_grads(self, dtype: torch.dtype) -> list[Tensor]:
        b, s, T, dim = self.G.shape
        P = torch.zeros(b, s, self.weight.shape[0], dim, dtype=dtype, device=self.G.device)
        index = self.tokens[:, None, :, None].expand(b, s, T, dim)
        return [P.scatter_add_(2, index, self.G.to(dtype))]


class PerSampleFactors(Factors):
    """Per-sample gradient rows P_p (b, s, *p.shape) for each parameter p."""

    def __init__(self, params: list[nn.Parameter], P: list[Tensor]):
        self.params, self.P = params, P

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        backend.gram_per_sample(K, _cat([P.to(K.dtype).flatten(2) for P in self.P], 2))

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        return [torch.tensordot(u, P.to(u.dtype), dims=2) for P in self.P]

    def per_sample_grads(self, dtype: torch.dtype) -> list[Tensor]:
        return [P.to(dtype) for P in self.P]


# --------------------------------------------------------------------------- rules


@dataclass
class RuleContext:
    """What every rule needs besides the module and its calls."""

    name: str  # the module's qualified name, for error messages
    b: int  # batch size
    s: int  # cotangent columns per sample
    dtype: torch.dtype  # accumulation dtype of the Gram (fp32 or fp64)
    seq_method: str = "auto"  # "auto" | "ghost" | "per_sample" for sequence layers


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _trainable(p: nn.Parameter | None) -> nn.Parameter | None:
    return p if p is not None and p.requires_grad else None


def _first_input(call: ModuleCall, name: str = "input") -> Tensor:
    return call.args[0] if call.args else call.kwargs[name]


def _used(calls: list[ModuleCall]) -> list[tuple[ModuleCall, Tensor]]:
    """(call, G) for the calls whose output reaches the loss."""
    return [(c, c.grads[0]) for c in calls if c.grads and c.grads[0] is not None]


def _check_batch(module_name: str, x: Tensor, b: int) -> None:
    if x.dim() == 0 or x.shape[0] != b:
        raise ValueError(
            f"module {module_name!r} received an input of shape {tuple(x.shape)} whose leading "
            f"dimension is not the batch size {b}; egn_fast needs per-sample inputs (b, …)"
        )


def linear_factors(module: nn.Linear, calls: list[ModuleCall], ctx: RuleContext) -> SeqFactors | None:
    A_parts, G_parts = [], []
    for call, G in _used(calls):
        a = _first_input(call).detach()
        _check_batch(ctx.name, a, ctx.b)
        A_parts.append(a.reshape(ctx.b, -1, a.shape[-1]))
        G_parts.append(G.reshape(ctx.b, ctx.s, -1, G.shape[-1]))
    if not A_parts:
        return None
    A, G = _cat(A_parts, 1), _cat(G_parts, 2)
    return SeqFactors(_trainable(module.weight), _trainable(module.bias), [(A, G)], ctx.seq_method)


def _unfold(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of a convolution input: (b, C, *spatial) -> (b, T, C·Πkernel), T output positions."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *conv.kernel_size), (1, *conv.dilation), (1, *conv.stride)
    else:
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def conv_factors(module: nn.Conv1d | nn.Conv2d, calls: list[ModuleCall], ctx: RuleContext) -> SeqFactors | None:
    A_parts, G_parts = [], []
    for call, G in _used(calls):
        x = _first_input(call).detach()
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if x.dim() != spatial + 2:
            raise ValueError(f"module {ctx.name!r} ({type(module).__name__}) needs batched input (b, C, …), got {tuple(x.shape)}")
        _check_batch(ctx.name, x, ctx.b)
        A_parts.append(_unfold(module, x))
        G_parts.append(G.flatten(3).transpose(2, 3))  # (b, s, out, T) -> (b, s, T, out)
    if not A_parts:
        return None
    A, G = _cat(A_parts, 1), _cat(G_parts, 2)
    g = module.groups
    n_in, n_out = A.shape[2] // g, G.shape[3] // g
    groups = [(A[:, :, i * n_in : (i + 1) * n_in], G[..., i * n_out : (i + 1) * n_out]) for i in range(g)]
    return SeqFactors(_trainable(module.weight), _trainable(module.bias), groups, ctx.seq_method)


def embedding_factors(module: nn.Embedding, calls: list[ModuleCall], ctx: RuleContext) -> EmbeddingFactors | None:
    tok_parts, G_parts = [], []
    for call, G in _used(calls):
        tokens = _first_input(call)
        _check_batch(ctx.name, tokens, ctx.b)
        tokens = tokens.reshape(ctx.b, -1)
        G = G.reshape(ctx.b, ctx.s, -1, G.shape[-1])
        if module.padding_idx is not None:  # the padding row gets no gradient
            G = G * (tokens != module.padding_idx)[:, None, :, None].to(G.dtype)
        tok_parts.append(tokens)
        G_parts.append(G)
    if not tok_parts:
        return None
    return EmbeddingFactors(module.weight, _cat(tok_parts, 1), _cat(G_parts, 2))


def _norm_factors(module: nn.Module, calls: list[ModuleCall], ctx: RuleContext, normalize: Callable[[Tensor], Tensor], channel_dim: int) -> PerSampleFactors | None:
    """Affine normalization z = x̂ ∘ weight + bias: per-sample grads Σ G∘x̂ and Σ G.

    channel_dim: 1 for GroupNorm/BatchNorm (weight per channel of (b, C, *spatial)), -1 for
    LayerNorm/RMSNorm (weight over the trailing normalized_shape of (b, *rest, *normalized)).
    """
    weight, bias = _trainable(getattr(module, "weight", None)), _trainable(getattr(module, "bias", None))
    used = _used(calls)
    if not used or (weight is None and bias is None):
        return None
    shape = (weight if weight is not None else bias).shape
    n = shape.numel()

    def channel_major(t: Tensor, lead: int) -> Tensor:  # (*lead dims, …) -> (*lead dims, n, L)
        if channel_dim == 1:
            return t.reshape(*t.shape[:lead], n, -1)
        return t.reshape(*t.shape[:lead], -1, n).transpose(-1, -2)

    Pw = Pb = 0
    for call, G in used:
        x = _first_input(call).detach()
        _check_batch(ctx.name, x, ctx.b)
        Gc = channel_major(G.to(ctx.dtype), 2)  # (b, s, n, L)
        if weight is not None:
            Pw = Pw + torch.einsum("bsnl,bnl->bsn", Gc, channel_major(normalize(x).to(ctx.dtype), 1))
        if bias is not None:
            Pb = Pb + Gc.sum(3)
    params = [p for p in (weight, bias) if p is not None]
    P = [q.view(ctx.b, ctx.s, *shape) for q, p in ((Pw, weight), (Pb, bias)) if p is not None]
    return PerSampleFactors(params, P)


def layernorm_factors(module: nn.LayerNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    return _norm_factors(module, calls, ctx, lambda x: F.layer_norm(x, module.normalized_shape, eps=module.eps), -1)


def rmsnorm_factors(module: nn.RMSNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    return _norm_factors(module, calls, ctx, lambda x: F.rms_norm(x, module.normalized_shape, eps=module.eps), -1)


def groupnorm_factors(module: nn.GroupNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    return _norm_factors(module, calls, ctx, lambda x: F.group_norm(x, module.num_groups, eps=module.eps), 1)


def batchnorm_factors(module: nn.modules.batchnorm._BatchNorm, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    def normalize(x: Tensor) -> Tensor:  # eval mode: running statistics, no mixing across samples
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - module.running_mean.view(view)) * torch.rsqrt(module.running_var.view(view) + module.eps)

    return _norm_factors(module, calls, ctx, normalize, 1)


_RULES: dict[type, Callable[..., Factors | None]] = {
    nn.Linear: linear_factors,
    nn.Conv1d: conv_factors,
    nn.Conv2d: conv_factors,
    nn.Embedding: embedding_factors,
    nn.LayerNorm: layernorm_factors,
    nn.RMSNorm: rmsnorm_factors,
    nn.GroupNorm: groupnorm_factors,
    nn.BatchNorm1d: batchnorm_factors,
    nn.BatchNorm2d: batchnorm_factors,
    nn.BatchNorm3d: batchnorm_factors,
}


def rule_for(module: nn.Module) -> Callable[..., Factors | None] | None:
    """The specific rule for `module`, or None (generic rule). A subclass that overrides
    forward (LoRA layers, custom convolutions, …) gets the generic rule."""
    for cls, rule in _RULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return rule
    return None


# --------------------------------------------------------------------------- generic rule


def generic_factors(
    module: nn.Module,
    calls: list[ModuleCall],
    ctx: RuleContext,
    params: dict[str, nn.Parameter],
) -> PerSampleFactors | None:
    """Per-sample gradients of `module`'s outputs w.r.t. `params` (names relative to `module`),
    contracted with the recorded output-gradients: P_ik = Σ_calls ∂(G_ik · z_i)/∂θ, by torch.func
    (vjp per sample, vmapped over the batch and the s cotangents). Other parameters are constants."""
    b, s = ctx.b, ctx.s
    theta = {n: p.detach() for n, p in params.items()}
    total: dict[str, Tensor] = {}
    for call in calls:
        if not any(g is not None for g in call.grads):
            continue
        cot = tuple(
            g if g is not None else torch.zeros(b, s, *z.shape[1:], dtype=z.dtype, device=z.device)
            for g, z in zip(call.grads, call.outputs)
        )
        leaves, spec = tree_flatten((call.args, call.kwargs))
        leaves = [x.detach() if isinstance(x, Tensor) else x for x in leaves]
        batched = [q for q, x in enumerate(leaves) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == b]
        index = call.output_index

        def one_sample(batched_i: tuple, cot_i: tuple) -> dict:
            leaves_i = list(leaves)
            for q, x in zip(batched, batched_i):
                leaves_i[q] = x.unsqueeze(0)
            args_i, kwargs_i = tree_unflatten(leaves_i, spec)

            def outputs(th: dict) -> tuple:
                out = tree_flatten(torch.func.functional_call(module, th, args_i, kwargs_i))[0]
                return tuple(out[q].squeeze(0) for q in index)

            _, vjp_fn = torch.func.vjp(outputs, theta)
            return torch.func.vmap(vjp_fn)(cot_i)[0]

        try:
            grads = torch.func.vmap(one_sample)(tuple(leaves[q] for q in batched), cot)
        except RuntimeError as err:
            if "random" in str(err).lower():
                raise RuntimeError(
                    f"module {ctx.name!r} ({type(module).__name__}) is handled by per-sample gradients "
                    "(torch.func) and draws random numbers in forward (dropout?): put the model "
                    "in eval mode or remove the randomness"
                ) from err
            raise
        for n, g in grads.items():
            total[n] = total[n] + g if n in total else g
    if not total:
        return None
    return PerSampleFactors([params[n] for n in total], list(total.values()))


def merge_shared(factors: list[Factors], dtype: torch.dtype) -> list[Factors]:
    """Parameters shared by several layers (tied across different modules): their rows are the
    sums of each layer's rows, so those layers are merged into one PerSampleFactors."""
    owners: dict[int, list[int]] = {}
    for i, f in enumerate(factors):
        for p in f.params:
            owners.setdefault(id(p), []).append(i)
    shared = {i for idx in owners.values() if len(idx) > 1 for i in idx}
    if not shared:
        return factors
    # Close the set: a merged layer pulls in every other layer that shares any of its parameters.
    changed = True
    while changed:
        changed = False
        for idx in owners.values():
            if shared.intersection(idx) and not shared.issuperset(idx):
                shared.update(idx)
                changed = True
    params: list[nn.Parameter] = []
    rows: dict[int, Tensor] = {}
    for i in sorted(shared):
        for p, P in zip(factors[i].params, factors[i].per_sample_grads(dtype)):
            if id(p) in rows:
                rows[id(p)] = rows[id(p)] + P
            else:
                params.append(p)
                rows[id(p)] = P
    merged = PerSampleFactors(params, [rows[id(p)] for p in params])
    return [f for i, f in enumerate(factors) if i not in shared] + [merged]
