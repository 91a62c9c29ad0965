"""Rules for the dense / sequence / convolution family: nn.Linear on (b, in) or (b, *, in),
Hugging Face's Conv1D (GPT-2's transposed Linear: y = x W + b, W (in, out)) and nn.Conv1d /
nn.Conv2d (unfolded to the sequence case, T = output positions)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..capture.hooks import ModuleCall
from .factors import SeqFactors, concat
from .registry import RuleContext, first_input, register_rule, register_rule_by_name, used_calls

__all__ = ["linear_factors", "conv1d_transposed_factors", "conv_factors"]


def _positions(calls: list[ModuleCall], ctx: RuleContext) -> tuple[Tensor, Tensor] | None:
    """A (b, T, in) with every position of every call along T (T = 1 for (b, in) inputs),
    G (b, s, T, out); None when no call reaches the loss."""
    A_parts, G_parts = [], []
    for call, G in used_calls(calls):
        a = first_input(call, ctx)
        A_parts.append(a.reshape(ctx.b, -1, a.shape[-1]))
        G_parts.append(G.reshape(ctx.b, ctx.s, -1, G.shape[-1]))
    if not A_parts:
        return None
    return concat(A_parts, 1), concat(G_parts, 2)


@register_rule(nn.Linear)
def linear_factors(module: nn.Linear, calls: list[ModuleCall], ctx: RuleContext) -> SeqFactors | None:
    """A (b, T, in), G (b, s, T, out); weight (out, in)."""
    AG = _positions(calls, ctx)
    return None if AG is None else SeqFactors(ctx.trainable(module.weight), ctx.trainable(module.bias), [AG], ctx.seq_method)


@register_rule_by_name("transformers.pytorch_utils", "Conv1D")
def conv1d_transposed_factors(module: nn.Module, calls: list[ModuleCall], ctx: RuleContext) -> SeqFactors | None:
    """Hugging Face's Conv1D (GPT-2): A (b, T, in), G (b, s, T, out); weight (in, out)."""
    AG = _positions(calls, ctx)
    return None if AG is None else SeqFactors(
        ctx.trainable(module.weight), ctx.trainable(module.bias), [AG], ctx.seq_method, transposed=True
    )


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


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_factors(module: nn.Conv1d | nn.Conv2d, calls: list[ModuleCall], ctx: RuleContext) -> SeqFactors | None:
    """One (A, G) pair per convolution group: A (b, T, in/groups·Πkernel) patches, G (b, s, T, out/groups)."""
    A_parts, G_parts = [], []
    for call, G in used_calls(calls):
        x = first_input(call, ctx, position_wise=False)
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if x.dim() != spatial + 2:
            raise ValueError(f"module {ctx.name!r} ({type(module).__name__}) needs batched input (b, C, …), got {tuple(x.shape)}")
        A_parts.append(_unfold(module, x))
        G_parts.append(G.flatten(3).transpose(2, 3))  # (b, s, out, T) -> (b, s, T, out)
    if not A_parts:
        return None
    A, G = concat(A_parts, 1), concat(G_parts, 2)
    g = module.groups
    n_in, n_out = A.shape[2] // g, G.shape[3] // g
    groups = [(A[:, :, i * n_in : (i + 1) * n_in], G[..., i * n_out : (i + 1) * n_out]) for i in range(g)]
    return SeqFactors(ctx.trainable(module.weight), ctx.trainable(module.bias), groups, ctx.seq_method)
