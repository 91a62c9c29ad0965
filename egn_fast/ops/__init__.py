"""Backend dispatch for the row-space ops.

Every backend implements the same op set (shapes in `torch_backend`):

    gram_dense(K, A, G, bias)          dense layer Gram, into K's lower triangle
    gram_seq(K, A, G, bias)            sequence layer Gram (ghost: no per-sample gradient stored)
    gram_embedding(K, tokens, G)       embedding Gram
    gram_per_sample(K, P)              Gram of per-sample gradient rows
    per_sample_seq(A, G, dtype)        per-sample gradient rows of a (sequence) linear layer
    per_sample_embedding(tokens, G, num_embeddings, dtype)
                                       per-sample gradient rows of an embedding table
    backproject(A, G, u, bias)         J̃ᵀu of a (sequence) linear layer
    backproject_embedding(tokens, G, u, num_embeddings)
    backproject_per_sample(P, u)       J̃ᵀu from per-sample gradient rows
    project(A, G, dW, db, dtype)       J̃v of a (sequence) linear layer (Monte-Carlo rows' J̃g)
    project_embedding(tokens, G, dE, dtype)
    project_per_sample(P, v, dtype)    J̃v from per-sample gradient rows
    cholesky_solve(A, B)               SPD solve, (X, info)
    cholesky_batched(A)                per-matrix Cholesky of a batch, (L, info)
    eigh(A)                            symmetric eigendecomposition, (evals, evecs)

`Backend` itself is the torch backend (the reference, CPU and GPU); an accelerated backend
subclasses it, overrides the ops it implements, and registers itself with `register_backend`.
backend="auto" picks a backend per op and device type from auto_table.json, which
benchmarks/kernels.py --write-auto-table fills from measured speed-ups.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import torch_backend

__all__ = ["Backend", "register_backend", "check_backend", "get_backend", "available_backends", "auto_table"]


class Backend:
    """The op set. This base class is the torch reference implementation."""

    name = "torch"
    gram_dense = staticmethod(torch_backend.gram_dense)
    gram_seq = staticmethod(torch_backend.gram_seq)
    gram_embedding = staticmethod(torch_backend.gram_embedding)
    gram_per_sample = staticmethod(torch_backend.gram_per_sample)
    per_sample_seq = staticmethod(torch_backend.per_sample_seq)
    per_sample_embedding = staticmethod(torch_backend.per_sample_embedding)
    backproject = staticmethod(torch_backend.backproject)
    backproject_embedding = staticmethod(torch_backend.backproject_embedding)
    backproject_per_sample = staticmethod(torch_backend.backproject_per_sample)
    project = staticmethod(torch_backend.project)
    project_embedding = staticmethod(torch_backend.project_embedding)
    project_per_sample = staticmethod(torch_backend.project_per_sample)
    cholesky_solve = staticmethod(torch_backend.cholesky_solve)
    cholesky_batched = staticmethod(torch_backend.cholesky_batched)
    eigh = staticmethod(torch_backend.eigh)

    @staticmethod
    def supports(device: torch.device) -> bool:
        """Whether this backend can run on tensors of `device`."""
        return True


# name -> factory; a factory may raise ImportError/RuntimeError when its toolchain is missing.
_REGISTRY: dict[str, Callable[[], Backend]] = {"torch": Backend}
_INSTANCES: dict[str, Backend] = {}
# backend="auto", per device type: the backend built from auto_table.json's per-op choices.
_AUTO: dict[str, Backend] = {}
AUTO_TABLE_PATH = Path(__file__).with_name("auto_table.json")


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make `factory()` available as backend `name`."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)
    _AUTO.clear()


def available_backends() -> list[str]:
    """Names of all registered backends."""
    return sorted(_REGISTRY)


def check_backend(name: str) -> None:
    """ValueError unless `name` is "auto" or a registered backend (checked before a model runs)."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()} or 'auto'")


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend `name` for tensors on `device`; "auto" picks each op's backend from
    `auto_table()` for the device type."""
    check_backend(name)
    if name == "auto":
        if device.type not in _AUTO:
            _AUTO[device.type] = _auto_backend(device)
        return _AUTO[device.type]
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    backend = _INSTANCES[name]
    if not backend.supports(device):
        raise ValueError(f"backend {name!r} does not support tensors on {device}")
    return backend


def auto_table() -> dict[str, dict[str, str]]:
    """device type -> op -> backend name, as backend="auto" uses it (ops not named: torch)."""
    return json.loads(AUTO_TABLE_PATH.read_text())["devices"]


def _auto_backend(device: torch.device) -> Backend:
    """A backend whose every op comes from the backend the table chooses for it on `device`'s type.

    A chosen backend that cannot be created (its toolchain is missing) or does not support the
    device is replaced by torch for that op, with a warning. All-torch choices give the torch backend.
    """
    ops: dict[str, staticmethod] = {}
    chosen: dict[str, str] = {}
    for op, choice in auto_table().get(device.type, {}).items():
        if op == "supports" or not callable(getattr(Backend, op, None)):
            raise ValueError(f"{AUTO_TABLE_PATH.name} names an unknown op {op!r}")
        if choice == "torch":
            continue
        try:
            backend = get_backend(choice, device)
        except (ImportError, RuntimeError, ValueError) as err:
            warnings.warn(f"backend='auto': {op} on {device.type} uses torch, not {choice!r}: {err}", stacklevel=3)
            continue
        ops[op] = staticmethod(getattr(backend, op))
        chosen[op] = choice
    if not ops:
        return get_backend("torch", device)
    composite = type("AutoBackend", (Backend,), {"name": "auto", "choices": chosen, **ops})
    return composite()


def _triton_backend() -> Backend:
    """The Triton kernels backend; ImportError when triton is not installed."""
    from .triton_backend import TritonBackend  # imports triton: ImportError when it is missing

    return TritonBackend()


def _cuda_backend() -> Backend:
    """The CUDA extension backend (egn_fast._C); ImportError when the extension was not built."""
    from .cuda_backend import CudaBackend

    return CudaBackend()


register_backend("triton", _triton_backend)
register_backend("cuda", _cuda_backend)
