"""Count the bytes every collective of a process sends, tagged by the stage that called it
(benchmarks/fsdp.py).

`CollectiveCounter` wraps, for the duration of a `with` block, the collective functions of
`torch.distributed` (the names egn_fast and FSDP2 call through the module attribute
`torch.distributed.X`: FSDP2's `_fsdp_collectives.py` calls `dist.all_gather_single`,
`dist.reduce_scatter_single` and, under HSDP, `dist.all_reduce`) and of the functional
collectives `torch.distributed._functional_collectives` (what DTensor's `full_tensor` and
redistributions call as `funcol.X`). A call made inside another wrapped call (a deprecated name
forwarding to its replacement) is counted once, by the outermost. Each call becomes the bytes this
rank sends under the ring algorithm, R ranks in the call's group:

| collective | bytes sent by this rank |
|---|---|
| all-gather of n bytes per rank | (R−1)·n |
| all-reduce of N bytes | 2(R−1)/R·N |
| reduce-scatter of N bytes (the whole input) | (R−1)/R·N |
| all-to-all of N bytes (the whole input) | N minus the block it keeps (even splits: (R−1)/R·N) |
| all_gather_object | (R−1)·(8 + pickled size): the size all-gather and this rank's payload |
| broadcast of N bytes | N (a ring forwards it from every rank but the last) |
| barrier | 0 |

The stage is read from the Python stack of the call (`stage_of`): FSDP2's parameter all-gathers
are split by the pass that triggered them (forward; the backward of egn_fast's `fsdp_gradient`,
i.e. the gradient; any other backward, i.e. EGN's batched backward or a first-order step's
backward), FSDP2's reduce-scatter likewise; egn_fast's own collectives are named by the innermost
egn_fast function on the stack (`EGN_STAGES` gives the known ones a readable name).
"""

from __future__ import annotations

import functools
import pickle
import sys
import threading
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# innermost egn_fast function on the stack → stage name
EGN_STAGES = {
    "gather_rows": "egn: factor all-gather (layer factors / rows + loss head)",
    "sync": "egn: sync (error/shape check)",
    "batch_share": "egn: sync (batch share)",
    "from_rank0": "egn: generator seed from rank 0",
    "check_replicated": "egn: replica checksum",
    "__init__": "egn: row all-to-all (shard route)",
    "add_gram": "egn: Gram all-reduce (shard route)",
    "backproject": "egn: back-projection all-gather (shard route)",
    "project": "egn: projection all-reduce (shard route)",
    "global_gradient": "egn: gradient all-reduce (plain parameters)",
    "full_value": "egn: parameter all-gather (full_value)",
    "all_reduce_sum": "egn: all-reduce",
    "solve_and_backproject": "egn: solve jitter all-reduce",
    "curvature": "egn: sᵀHs all-reduce",
    "loss_at": "egn: trial-loss all-gather",
}

# egn_fast helpers that several stages call: their stage names the caller too
HELPERS = {"full_value", "all_reduce_sum", "all_reduce_mean", "sync"}

# (module, name, kind, position of the group argument); kind says how the arguments become bytes
WRAPPED = [(dist, name, kind, g) for name, kind, g in [
    ("all_gather", "gather_list", 2), ("all_gather_into_tensor", "gather_io", 2), ("all_gather_single", "gather_io", 2),
    ("reduce_scatter_tensor", "scatter_io", 3), ("reduce_scatter_single", "scatter_io", 3),
    ("reduce_scatter", "scatter_list", 3), ("all_reduce", "reduce", 2), ("all_to_all_single", "a2a", 4),
    ("broadcast", "broadcast", 2), ("all_gather_object", "object", 2), ("barrier", "barrier", 0),
]] + [(funcol, name, kind, g) for name, kind, g in [
    ("all_gather_tensor", "f_gather", 2), ("all_gather_single", "f_gather", 2), ("all_gather_tensor_autograd", "f_gather", 2),
    ("all_gather_single_autograd", "f_gather", 2), ("all_reduce", "f_reduce", 2), ("reduce_scatter_tensor", "f_scatter", 3),
    ("reduce_scatter_single", "f_scatter", 3), ("reduce_scatter_tensor_autograd", "f_scatter", 3),
    ("reduce_scatter_single_autograd", "f_scatter", 3), ("all_to_all_single", "f_a2a", 3),
    ("all_to_all_single_autograd", "f_a2a", 3), ("broadcast", "f_broadcast", 2),
]]


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def group_size(group: Any) -> int:
    """R of a c10d group (None: the world) or of a functional collective's group argument."""
    if group is None or isinstance(group, dist.ProcessGroup):
        return dist.get_world_size(group)
    if isinstance(group, (list, tuple)) and group and isinstance(group[0], int):
        return len(group)
    return dist.get_world_size(resolved(group))


def resolved(group: Any) -> dist.ProcessGroup:
    """The c10d group of a functional collective's group argument (a mesh and dim, a name, ...)."""
    group = funcol._resolve_group(group)
    return dist.distributed_c10d._resolve_process_group(group) if isinstance(group, str) else group


def sent_bytes(kind: str, group_arg: int, args: tuple, kwargs: dict) -> int:
    """Bytes this rank sends in one call (ring algorithm; the module docstring's table)."""
    arg = lambda i, name, default=None: args[i] if len(args) > i else kwargs.get(name, default)  # noqa: E731
    group = arg(group_arg, "group")
    R = group_size(group)
    if kind == "barrier":
        return 0
    if kind in ("gather_list", "gather_io"):
        return (R - 1) * nbytes(arg(1, "tensor" if kind == "gather_list" else "input_tensor"))
    if kind == "f_gather":
        return (R - 1) * nbytes(arg(0, "self"))
    if kind in ("scatter_io", "f_scatter"):
        return (R - 1) * nbytes(arg(1, "input") if kind == "scatter_io" else arg(0, "self")) // R
    if kind == "scatter_list":
        return (R - 1) * sum(nbytes(t) for t in arg(1, "input_list")) // R
    if kind in ("reduce", "f_reduce"):
        return 2 * (R - 1) * nbytes(arg(0, "tensor" if kind == "reduce" else "self")) // R
    if kind in ("a2a", "f_a2a"):
        t = arg(1, "input") if kind == "a2a" else arg(0, "self")
        splits = arg(3, "input_split_sizes") if kind == "a2a" else arg(2, "input_split_sizes")
        if not splits:
            return (R - 1) * nbytes(t) // R
        row = nbytes(t) // max(t.shape[0], 1)
        rank = dist.get_rank(group if kind == "a2a" else resolved(group))
        return nbytes(t) - splits[rank] * row
    if kind in ("broadcast", "f_broadcast"):
        return nbytes(arg(0, "tensor" if kind == "broadcast" else "self"))
    if kind == "object":
        return (R - 1) * (8 + len(pickle.dumps(arg(1, "obj"))))
    raise ValueError(kind)


def stage_of(name: str) -> str:
    """The stage of a collective called now: read from the Python stack (module docstring)."""
    frames, f = [], sys._getframe(2)
    while f is not None:
        frames.append((f.f_code.co_filename.replace("\\", "/"), f.f_code.co_name))
        f = f.f_back
    funcs = {fn for _, fn in frames}
    in_fsdp = any("/fsdp/_fully_shard/" in path for path, _ in frames)
    if in_fsdp:
        what = "param all-gather" if "gather" in name else "grad reduce-scatter" if "scatter" in name else name
        backward = bool(funcs & {"_pre_backward", "_backward_prefetch", "post_backward", "_root_post_backward_final_callback"})
        if not backward:
            return f"FSDP {what}, forward"
        return f"FSDP {what}, {'gradient backward' if 'fsdp_gradient' in funcs else 'batched/other backward'}"
    mine = [(path.split("/egn_fast/")[1], fn) for path, fn in frames if "/egn_fast/" in path and not fn.startswith("<")]
    if not mine:  # innermost first, comprehensions skipped
        return f"other: {name}"
    fn = mine[0][1]
    if fn in HELPERS and len(mine) > 1:  # a shared helper: named with its caller
        return f"{EGN_STAGES.get(fn, 'egn: ' + fn)} ← {mine[1][0]}:{mine[1][1]}"
    return EGN_STAGES.get(fn, f"egn: {fn}")


class CollectiveCounter:
    """Within `with counter:`, every wrapped collective's bytes (`sent_bytes`) are added to
    `counter.stages[stage]` and its calls to `counter.calls[stage]`."""

    def __init__(self) -> None:
        self.stages: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[Any, str, Callable]] = []
        self._depth = threading.local()

    def _wrap(self, fn: Callable, name: str, kind: str, group_arg: int) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                stage = stage_of(name)
                self.stages[stage] += sent_bytes(kind, group_arg, args, kwargs)
                self.calls[stage] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return wrapper

    def __enter__(self) -> "CollectiveCounter":
        for module, name, kind, group_arg in WRAPPED:
            fn = getattr(module, name, None)
            if fn is not None:
                self._saved.append((module, name, fn))
                setattr(module, name, self._wrap(fn, name, kind, group_arg))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    def total(self) -> int:
        """All counted bytes."""
        return sum(self.stages.values())
