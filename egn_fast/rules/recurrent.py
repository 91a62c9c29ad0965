"""The rule for nn.RNN / nn.GRU / nn.LSTM: per-sample gradient rows by torch.func over a
functional re-implementation of the recurrence (`run_recurrence`), with the module's own weights.

The recurrent kernels cannot be vmapped per sample, and their tensors are batch-major only with
batch_first=True, so the rule
- moves the batch dimension of every recorded tensor to the front (input (T, b, in) or
  (b, T, in); h0/c0 and h_n/c_n (layers·directions, b, H)),
- checks that the re-implementation reproduces the module's recorded outputs (else refuses), and
- returns rows P (b, s, *param.shape) = Σ_outputs ∂(G_ik · z_i)/∂θ for every trainable weight.
Refused: PackedSequence inputs, unbatched inputs, dropout between layers in train mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capture import ModuleCall
from .factors import PerSampleFactors
from .registry import RuleContext, check_batch, first_input, register_rule

__all__ = ["recurrent_factors", "run_recurrence"]

# Relative/absolute tolerance of the check that the re-implementation reproduces the module: a
# mismatch in configuration shows as O(0.1) differences; fp32 allows for cuDNN's TF32 kernels.
_REPRODUCE_TOL = {torch.float64: 1e-9, torch.float32: 1e-2}


def _batch_major(x: Tensor, batch_dim: int) -> Tensor:
    """A recorded tensor with its batch dimension moved to the front."""
    return x.movedim(batch_dim, 0)


def _grad_batch_major(G: Tensor, batch_dim: int) -> Tensor:
    """An output-gradient as capture stores it, (z.shape[0], s, *z.shape[1:]), as (b, s, …)
    with the batch dimension `batch_dim` of z in front (the rest in order)."""
    return G.movedim(1, 0).movedim(1 + batch_dim, 0)


def _cell(mode: str, gi: Tensor, h: Tensor, c: Tensor | None, w: dict[str, Tensor], key: str) -> tuple[Tensor, Tensor | None]:
    """One step for one sample: gi (gates·H,) the input projection, h (H_out,), c (H,) (LSTM only)."""
    gh = h @ w["weight_hh" + key].T
    if "bias_hh" + key in w:
        gh = gh + w["bias_hh" + key]
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None
    if mode == "GRU":
        ir, iz, inn = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, None
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if "weight_hr" + key in w:
        h = h @ w["weight_hr" + key].T
    return h, c


def run_recurrence(module: nn.RNNBase, w: dict[str, Tensor], x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The module's forward for one sample, with weights `w` (the module's parameter names).

    x (T, in); states () for zeros, (h0,) or (h0, c0) with h0 (L·D, H_out), c0 (L·D, H).
    Returns (output (T, D·H_out), h_n (L·D, H_out)) and, for an LSTM, c_n (L·D, H).
    """
    lstm = module.mode == "LSTM"
    D = 2 if module.bidirectional else 1
    h_out = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    h_last, c_last = [], []
    layer_in = x
    for layer in range(module.num_layers):
        outs = []
        for direction in range(D):
            key = f"_l{layer}" + ("_reverse" if direction else "")
            q = layer * D + direction
            h = states[0][q] if states else x.new_zeros(h_out)
            c = (states[1][q] if states else x.new_zeros(module.hidden_size)) if lstm else None
            gi = layer_in @ w["weight_ih" + key].T  # (T, gates·H), all steps at once
            if "bias_ih" + key in w:
                gi = gi + w["bias_ih" + key]
            steps = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
            hs = {}
            for t in steps:
                h, c = _cell(module.mode, gi[t], h, c, w, key)
                hs[t] = h
            outs.append(torch.stack([hs[t] for t in range(x.shape[0])]))
            h_last.append(h)
            c_last.append(c)
        layer_in = torch.cat(outs, -1)
    result = (layer_in, torch.stack(h_last))
    return result + (torch.stack(c_last),) if lstm else result


def _refuse(ctx: RuleContext, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"module {ctx.name!r} ({type(module).__name__}) {why}")


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def recurrent_factors(module: nn.RNNBase, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """Rows P (b, s, *param.shape) for the trainable weights: vjp per sample of the outputs that
    reach the loss (output, h_n, c_n) with their recorded output-gradients, vmapped over b and s."""
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise _refuse(ctx, module, "applies dropout between layers in train mode, which egn_fast cannot "
                      "re-evaluate per sample: call .eval() on it or set dropout=0")
    weights = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
    trainable = {n: w for n, w in weights.items() if ctx.trainable(getattr(module, n)) is not None}
    if not trainable:
        return None
    batch_dims = (0 if module.batch_first else 1, 1, 1)  # output, h_n, c_n
    total: dict[str, Tensor] = {}
    for call in calls:
        used = [(q, G) for q, G in zip(call.output_index, call.grads) if G is not None]
        if not used:
            continue
        x, hx = first_input(call), call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise _refuse(ctx, module, "received a PackedSequence, whose rows mix the samples: pass a "
                          "padded tensor (nn.utils.rnn.pad_packed_sequence) and pick each sample's last step")
        if x.dim() != 3:
            raise _refuse(ctx, module, f"needs a batched input (3-D), got shape {tuple(x.shape)}")
        x = _batch_major(x.detach(), batch_dims[0])
        check_batch(ctx.name, x, ctx.b)
        states = () if hx is None else tuple(_batch_major(h.detach(), 1) for h in (hx if isinstance(hx, tuple) else (hx,)))
        recorded = [_batch_major(z.detach(), batch_dims[q]) for q, z in zip(call.output_index, call.outputs)]
        _check_reproduces(module, ctx, weights, x, states, call.output_index, recorded)
        cot = tuple(_grad_batch_major(G, batch_dims[q]) for q, G in used)
        index = [q for q, _ in used]

        def one_sample(x_i: Tensor, states_i: tuple[Tensor, ...], cot_i: tuple[Tensor, ...]) -> dict[str, Tensor]:
            def outputs(th: dict[str, Tensor]) -> tuple[Tensor, ...]:
                out = run_recurrence(module, {**weights, **th}, x_i, states_i)
                return tuple(out[q] for q in index)

            _, vjp_fn = torch.func.vjp(outputs, trainable)
            return torch.func.vmap(vjp_fn)(cot_i)[0]

        grads = torch.func.vmap(one_sample)(x, states, cot)
        for n, g in grads.items():
            total[n] = total[n] + g if n in total else g
    if not total:
        return None
    return PerSampleFactors([getattr(module, n) for n in total], list(total.values()))


def _check_reproduces(
    module: nn.RNNBase, ctx: RuleContext, weights: dict[str, Tensor], x: Tensor, states: tuple[Tensor, ...],
    index: list[int], recorded: list[Tensor],
) -> None:
    """ValueError unless run_recurrence gives the recorded outputs (batch-major) of this call."""
    out = torch.func.vmap(lambda x_i, s_i: run_recurrence(module, weights, x_i, s_i))(x, states)
    tol = _REPRODUCE_TOL.get(x.dtype, 5e-2)
    for q, z in zip(index, recorded):
        if not torch.allclose(out[q].to(z.dtype), z, rtol=tol, atol=tol):
            raise _refuse(ctx, module, "is not reproduced by egn_fast's re-implementation of its recurrence "
                          f"(output {q} differs by {float((out[q] - z).abs().max()):.3g}); please report this configuration")
