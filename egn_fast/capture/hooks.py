"""Capture: run the model once with hooks that record every module call, then get all
output-gradients in one batched backward.

The forward hooks keep references (no copies) to each call's inputs and outputs. Afterwards
`output_grads` runs ONE backward with the s cotangent columns of S batched (vmap through
`is_grads_batched`) and asks only for the gradients of the recorded outputs z, so autograd
prunes every weight-gradient GEMM: only activation gradients are computed.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .layout import PLAIN, BatchDim, expand_shared, to_batch_first

__all__ = ["Inputs", "Closure", "forward_of", "ModuleCall", "Capture", "output_grads", "params_reached_outside"]

Inputs = Tensor | tuple | list | dict
Closure = Callable[[], tuple[Tensor, Tensor]]


def _call_model(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward_of(model: nn.Module, inputs: Inputs | None, targets: Tensor | None, closure: Closure | None) -> Closure:
    """One way to run the model: `closure() -> (outputs, targets)`, or (inputs, targets) wrapped as one.

    inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments).
    """
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


# Modules whose recorded input or output was modified in place by the model in an earlier
# call; their hooks store copies from then on (see Capture.stale_modules).
_COPY_IO: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, tuple) and all(isinstance(x, Tensor) for x in tree):
        return list(tree)  # the common case (positional tensor arguments), without pytree
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


class ModuleCall:
    """One call of a module: its inputs, the outputs that carry gradient, and their gradients.

    outputs[q] is output leaf number output_index[q] (pytree order); layouts[q] says where its
    samples lie (set by the plan, layout.py); expanded holds the q whose output is shared by
    all samples: handed to the model as (b, …) copies (outputs[q] is then that copy), or, for
    the q in `rowwise` (a shared output the model cannot take as copies), left as it is and
    given one output-gradient per Jacobian row. Rules treat both alike (`batch_first`).
    grads[q] is filled by `output_grads`: (b, s, *rest) with rest = outputs[q]'s shape less the
    samples (`to_batch_first`; for an expanded output, its shape once expanded less the
    samples), or None when that output does not reach the loss. (A plain class with slots: the
    hooks make one per module call, every step.)
    """

    __slots__ = ("args", "kwargs", "inputs", "outputs", "output_index", "expanded", "rowwise", "layouts", "grads", "versions")

    def __init__(
        self,
        args: tuple,
        kwargs: dict,
        inputs: list[Tensor],  # the tensors among args and kwargs
        outputs: list[Tensor],
        output_index: list[int],
        expanded: frozenset[int] = frozenset(),
        rowwise: frozenset[int] = frozenset(),
    ):
        self.args, self.kwargs, self.inputs, self.outputs, self.output_index = args, kwargs, inputs, outputs, output_index
        self.expanded, self.rowwise = expanded, rowwise
        self.layouts: list[BatchDim] = [PLAIN] * len(outputs)
        self.grads: list[Tensor | None] = []
        self.versions = [t._version for t in inputs] + [t._version for t in outputs]

    def batch_first(self, x: Tensor, b: int) -> Tensor:
        """An input of a position-wise module (Linear, Embedding, LayerNorm, …), laid out like
        its first output, as (b, *rest): seq-first and folded inputs are moved, shared inputs
        of an expanded call are expanded the same way as the output."""
        if 0 in self.expanded:
            return expand_shared(x, b)
        return to_batch_first(x, self.layouts[0] if self.layouts else PLAIN, b)

    @property
    def modified_in_place(self) -> bool:
        return any(t._version != v for t, v in zip(self.inputs + self.outputs, self.versions))


class Capture:
    """Context manager: forward hooks on `modules` that record their calls in `self.calls`.

    The hooks are removed on exit, so later re-runs of a module (the generic rule's torch.func
    calls) record nothing. expand: {(module, call number, output number q): shape} of outputs
    that are shared by all samples (layout.py); an output of that shape is handed on as
    b copies, batch size b, unless its key is in `rowwise` (then it is recorded as shared and
    left as it is; `output_grads` gives it one output-gradient per row).
    """

    def __init__(
        self,
        modules: list[nn.Module],
        expand: dict[tuple[nn.Module, int, int], tuple] | None = None,
        b: int = 0,
        rowwise: frozenset[tuple[nn.Module, int, int]] = frozenset(),
    ):
        self.modules = modules
        self.calls: dict[nn.Module, list[ModuleCall]] = {}
        self.expand = expand or {}
        self.rowwise = rowwise
        self.b = b
        self.output_shape: tuple[int, ...] = ()  # the model's outputs (b, …) before flattening
        self._handles: list[Any] = []

    def __enter__(self) -> "Capture":
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, Tensor):  # the common case, without pytree
            leaves, spec = [output], None
            index = [0] if output.requires_grad else []
        else:
            leaves, spec = tree_flatten(output)
            index = [q for q, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
        replaced = None
        expanded = rowwise = frozenset()
        if self.expand:
            n = len(self.calls.get(module, []))
            expanded = frozenset(
                j for j, q in enumerate(index) if self.expand.get((module, n, j)) == tuple(leaves[q].shape)
            )
            rowwise = frozenset(j for j in expanded if (module, n, j) in self.rowwise)
        if expanded or len(index) > 1:
            leaves = list(leaves)
            for j, q in enumerate(index):
                if j in rowwise:
                    continue
                if j in expanded:
                    leaves[q] = expand_shared(leaves[q], self.b)
                elif len(index) > 1:
                    # One output may be computed from another inside the module (LSTMCell's h' from
                    # c'). The gradient of the output itself would then include that path, which
                    # the rule's vjp through the module adds again: hand on an alias, whose
                    # gradient holds only the uses after the module.
                    leaves[q] = leaves[q].view_as(leaves[q])
            replaced = leaves[0] if spec is None else tree_unflatten(leaves, spec)
        if _COPY_IO and module in _COPY_IO:  # (a WeakSet lookup makes a weak reference)
            # The model modifies this module's input or output in place later on: keep pristine
            # copies, and hand the model a copy of the output so our z keeps its autograd node.
            args, kwargs = tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, (args, kwargs))
            passed = list(leaves)
            for q in index:
                passed[q] = leaves[q].clone()
            replaced = passed[0] if spec is None else tree_unflatten(passed, spec)
        inputs = _tensors(args) if not kwargs else _tensors((args, kwargs))
        call = ModuleCall(args, kwargs, inputs, [leaves[q] for q in index], index, expanded, rowwise)
        self.calls.setdefault(module, []).append(call)
        return replaced

    def stale_modules(self, modules: list[nn.Module]) -> list[nn.Module]:
        """Modules among `modules` whose recorded tensors were modified in place after recording.

        They are remembered, so the next capture stores copies for them.
        """
        stale = [m for m in modules if any(c.modified_in_place for c in self.calls.get(m, []))]
        for m in stale:
            _COPY_IO.add(m)
        return stale


def output_grads(f_flat: Tensor, cotangents: Tensor, calls: list[ModuleCall]) -> None:
    """One batched backward: fill call.grads with ∂(S_{:,k}·f)/∂z for every recorded output z.

    f_flat: (b, c) model outputs; cotangents: (s, b, c), column k of S for every sample.
    Each gradient is stored sample-major: (b, s, *rest), the samples taken from where
    call.layouts says they lie in z. A row-wise shared output gets ∂(S_ik·f_i)/∂z for every
    row (i, k) from a backward of its own with one cotangent per row (`_rowwise_grads`).
    """
    s, b = cotangents.shape[0], f_flat.shape[0]
    zs = [z for call in calls for z in call.outputs]
    layouts = [layout for call in calls for layout in call.layouts]
    row_wise = [q in call.rowwise for call in calls for q in range(len(call.outputs))]
    rows = [k for k, r in enumerate(row_wise) if r]
    plain = [k for k, r in enumerate(row_wise) if not r]
    grads: list[Tensor | None] = [None] * len(zs)
    for k, g in zip(rows, _rowwise_grads(f_flat, cotangents, [zs[k] for k in rows])):
        grads[k] = g
    if s == 1:  # one column: a plain backward (a contiguous cotangent: an expanded one is slower)
        found = torch.autograd.grad(f_flat, [zs[k] for k in plain], cotangents[0].contiguous(), allow_unused=True)
        found = [None if g is None else g.unsqueeze(0) for g in found]
    else:
        found = torch.autograd.grad(f_flat, [zs[k] for k in plain], cotangents, is_grads_batched=True, allow_unused=True)
    for k, g in zip(plain, found):
        grads[k] = None if g is None else to_batch_first(g, layouts[k].shifted(1), b)
    start = 0
    for call in calls:
        call.grads = grads[start : start + len(call.outputs)]
        start += len(call.outputs)


# A row-wise backward takes at most this many rows' cotangents at once.
_ROWWISE_CHUNK = 32


def _rowwise_grads(f_flat: Tensor, cotangents: Tensor, zs: list[Tensor]) -> list[Tensor | None]:
    """∂(S_ik·f_i)/∂z for every row (i, k) and every z shared by all samples: (b, s, *z
    expanded less its samples), or None where f does not depend on z. The batched backward cannot
    give these (it sums the rows of all samples into a shared z), so every row gets a cotangent
    of its own, `_ROWWISE_CHUNK` rows per backward; the graph is kept for the batched one."""
    if not zs:
        return []
    s, b, c = cotangents.shape
    per_row = torch.zeros(b, s, b, c, dtype=cotangents.dtype, device=cotangents.device)
    samples = torch.arange(b, device=cotangents.device)
    per_row[samples, :, samples, :] = cotangents.permute(1, 0, 2)  # row (i, k) holds S_ik at sample i only
    per_row = per_row.view(b * s, b, c)
    chunks = [
        torch.autograd.grad(f_flat, zs, per_row[r : r + _ROWWISE_CHUNK], is_grads_batched=True, allow_unused=True, retain_graph=True)
        for r in range(0, b * s, _ROWWISE_CHUNK)
    ]
    shapes = [z.shape[1:] if z.dim() and z.shape[0] == 1 else z.shape for z in zs]  # as `expand_shared` lays it out
    return [
        None if parts[0] is None else torch.cat(parts).view(b, s, *shape)
        for parts, shape in zip(zip(*chunks), shapes)
    ]


def params_reached_outside(f: Tensor, regions: list[ModuleCall]) -> set[int]:
    """ids of the leaf tensors (parameters) that the autograd graph of f reaches outside `regions`.

    A region is a call handled by a layer rule: the walk jumps from its outputs straight to its
    inputs, so the parameters used inside it are not reported. What is reported is used
    somewhere no rule sees (functional use, a module that was not called, a parameter passed as
    a layer input). Refuses a reentrant torch.utils.checkpoint in the graph (ValueError).
    """
    jump: dict[Any, list[Tensor]] = {}
    for call in regions:
        for z in call.outputs:
            if z.grad_fn is not None:
                jump.setdefault(z.grad_fn, []).extend(call.inputs)
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [f.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "CheckpointFunctionBackward":
            # its backward re-runs the forward and raises under torch.autograd.grad, which every
            # later stage uses; the non-reentrant checkpoint records an ordinary graph
            raise ValueError(
                "the model uses torch.utils.checkpoint with use_reentrant=True, whose backward does not support "
                "torch.autograd.grad: use use_reentrant=False (Hugging Face: model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False}))"
            )
        if node in jump:
            for a in jump[node]:
                if a.grad_fn is not None:
                    stack.append(a.grad_fn)
                elif a.requires_grad:
                    reached.add(id(a))
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return reached
