"""The rules for nn.RNN / nn.GRU / nn.LSTM and their cells nn.RNNCell / nn.GRUCell / nn.LSTMCell:
per-sample gradient rows by torch.func over a functional re-implementation of the recurrence
(`run_recurrence`, `run_cell`) with the module's own weights.

The recurrent kernels cannot be vmapped per sample, and a sequence layer's tensors are
batch-major only with batch_first=True, so the rules
- move the batch dimension of every recorded input and output to the front (input (T, b, in) or
  (b, T, in); h0/c0 and h_n/c_n (layers·directions, b, H); a cell's (b, in), (b, H)),
- check that the re-implementation reproduces the module's recorded outputs (else refuse), and
- return rows P (b, s, *param.shape) = Σ_outputs ∂(G_ik · z_i)/∂θ for every trainable weight.
Refused: PackedSequence inputs, unbatched inputs, dropout between layers in train mode.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..capture.hooks import ModuleCall
from ..dtensors import full_value
from .factors import PerSampleFactors
from .generic import per_sample_vjp
from .registry import RuleContext, register_rule

__all__ = ["recurrent_factors", "cell_factors", "run_recurrence", "run_cell"]

# Relative/absolute tolerance of the check that the re-implementation reproduces the module: a
# mismatch in configuration shows as O(0.1) differences; fp32 allows for cuDNN's TF32 kernels.
_REPRODUCE_TOL = {torch.float64: 1e-9, torch.float32: 1e-2}

# forward(weights, x_i, states_i) -> the module's output leaves for one sample
SampleForward = Callable[[dict[str, Tensor], Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]]


def _batch_major(x: Tensor, batch_dim: int) -> Tensor:
    """A recorded tensor with its batch dimension moved to the front."""
    return x.movedim(batch_dim, 0)


def _arguments(call: ModuleCall) -> tuple[Tensor, Tensor | tuple[Tensor, ...] | None]:
    """The call's input (as passed: its samples where the layout puts them) and hx (or None)."""
    x = call.args[0] if call.args else call.kwargs["input"]
    return x, call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")


def _refuse(ctx: RuleContext, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"module {ctx.name!r} ({type(module).__name__}) {why}")


def _cell(
    mode: str, gi: Tensor, h: Tensor, c: Tensor | None, w: dict[str, Tensor], key: str
) -> tuple[Tensor, Tensor | None]:
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
            hs = []
            for t in range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0]):
                h, c = _cell(module.mode, gi[t], h, c, w, key)
                hs.append(h)
            outs.append(torch.stack(hs[::-1] if direction else hs))  # (T, H_out) in time order
            h_last.append(h)
            c_last.append(c)
        layer_in = torch.cat(outs, -1)
    result = (layer_in, torch.stack(h_last))
    return result + (torch.stack(c_last),) if lstm else result


def _cell_mode(cell: nn.RNNCellBase) -> str:
    if isinstance(cell, nn.LSTMCell):
        return "LSTM"
    if isinstance(cell, nn.GRUCell):
        return "GRU"
    return "RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU"


def run_cell(
    cell: nn.RNNCellBase, w: dict[str, Tensor], x: Tensor, states: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """The cell's forward for one sample: x (in,), states () for zeros, (h,) or (h, c), each (H,).
    Returns (h',) or, for an LSTMCell, (h', c'). (An output computed from another, as the CPU
    LSTMCell's h' from c', is fine: capture hands on aliases, so each gradient is its own.)"""
    mode = _cell_mode(cell)
    gi = x @ w["weight_ih"].T
    if "bias_ih" in w:
        gi = gi + w["bias_ih"]
    h = states[0] if states else x.new_zeros(cell.hidden_size)
    c = (states[1] if states else x.new_zeros(cell.hidden_size)) if mode == "LSTM" else None
    h, c = _cell(mode, gi, h, c, w, "")
    return (h, c) if mode == "LSTM" else (h,)


Layout = tuple[Tensor, tuple[Tensor, ...], tuple[int, ...], SampleForward]


def _sequence_layout(module: nn.RNNBase, call: ModuleCall, ctx: RuleContext) -> Layout:
    """x (b, T, in), states (h0,) / (h0, c0) each (b, L·D, H) or (), the batch dimension of each
    output leaf (output, h_n, c_n), and the per-sample forward."""
    x, hx = _arguments(call)
    if isinstance(x, nn.utils.rnn.PackedSequence):
        raise _refuse(ctx, module, "received a PackedSequence, whose rows mix the samples: pass a "
                      "padded tensor (nn.utils.rnn.pad_packed_sequence) and pick each sample's last step")
    if x.dim() != 3:
        raise _refuse(ctx, module, f"needs a batched input (3-D), got shape {tuple(x.shape)}")
    states = () if hx is None else tuple(_batch_major(h, 1) for h in (hx if isinstance(hx, tuple) else (hx,)))
    batch_dim = 0 if module.batch_first else 1
    return _batch_major(x, batch_dim), states, (batch_dim, 1, 1), lambda w, x_i, s_i: run_recurrence(module, w, x_i, s_i)


def _cell_layout(cell: nn.RNNCellBase, call: ModuleCall, ctx: RuleContext) -> Layout:
    """x (b, in), states (h,) / (h, c) each (b, H) or (); every output leaf is batch-major."""
    x, hx = _arguments(call)
    if x.dim() != 2:
        raise _refuse(ctx, cell, f"needs a batched input (2-D), got shape {tuple(x.shape)}")
    states = () if hx is None else (hx if isinstance(hx, tuple) else (hx,))
    return x, states, (0, 0), lambda w, x_i, s_i: run_cell(cell, w, x_i, s_i)


def _recurrent_rows(
    module: nn.Module, calls: list[ModuleCall], ctx: RuleContext, layout: Callable[[nn.Module, ModuleCall, RuleContext], Layout]
) -> PerSampleFactors | None:
    """Rows P (b, s, *param.shape) for the trainable weights: vjp per sample of the recorded outputs
    with their output-gradients (zeros for an output that does not reach the loss), vmapped over
    b and s; the re-implementation must reproduce the recorded outputs."""
    weights = {n: full_value(p) for n, p in module.named_parameters(recurse=False)}
    trainable = {n: w for n, w in weights.items() if ctx.trainable(getattr(module, n)) is not None}
    if not trainable:
        return None
    total: dict[str, Tensor] = {}
    for call in calls:
        if all(G is None for G in call.grads):
            continue
        x, states, batch_dims, forward = layout(module, call, ctx)
        x, states = x.detach(), tuple(h.detach() for h in states)
        if x.shape[0] != ctx.b:
            raise _refuse(ctx, module, f"received an input of shape {tuple(x.shape)} that does not hold the {ctx.b} samples")
        # every recorded output batch-first by the module's layout (also those that do not reach the
        # loss, whose probed layout is unknown); capture laid out the gradients alike (b, s, …)
        index = call.output_index
        recorded = [_batch_major(z.detach(), batch_dims[q]) for q, z in zip(index, call.outputs)]
        cot = tuple(
            G if G is not None else z.new_zeros(ctx.b, ctx.s, *z.shape[1:]) for G, z in zip(call.grads, recorded)
        )

        def outputs(th: dict[str, Tensor], xs_i: tuple[Tensor, tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
            out_i = forward({**weights, **th}, *xs_i)
            return tuple(out_i[q] for q in index)

        grads, reproduced = per_sample_vjp(outputs, trainable, (x, states), cot)
        for q, got, want in zip(index, reproduced, recorded):
            _check_reproduces(module, ctx, q, got, want)
        for n, g in grads.items():
            total[n] = total[n] + g if n in total else g
    if not total:
        return None
    return PerSampleFactors([getattr(module, n) for n in total], list(total.values()))


def _check_reproduces(module: nn.Module, ctx: RuleContext, q: int, reproduced: Tensor, recorded: Tensor) -> None:
    """ValueError unless the re-implementation's output leaf q equals the recorded one (batch-major)."""
    tol = _REPRODUCE_TOL.get(recorded.dtype, 5e-2)
    if not torch.allclose(reproduced.to(recorded.dtype), recorded, rtol=tol, atol=tol):
        raise _refuse(ctx, module, "is not reproduced by egn_fast's re-implementation of its recurrence "
                      f"(output {q} differs by {float((reproduced - recorded).abs().max()):.3g}); please report this configuration")


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def recurrent_factors(module: nn.RNNBase, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """Sequence layers: rows through `run_recurrence` (outputs output, h_n and, for an LSTM, c_n)."""
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise _refuse(ctx, module, "applies dropout between layers in train mode, which egn_fast cannot "
                      "re-evaluate per sample: call .eval() on it or set dropout=0")
    return _recurrent_rows(module, calls, ctx, _sequence_layout)


@register_rule(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
def cell_factors(module: nn.RNNCellBase, calls: list[ModuleCall], ctx: RuleContext) -> PerSampleFactors | None:
    """Cells: rows through `run_cell` (outputs h' and, for an LSTMCell, c')."""
    return _recurrent_rows(module, calls, ctx, _cell_layout)
