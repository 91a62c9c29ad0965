"""Backend dispatch for the row-space ops.

Every backend implements the same op set (shapes in `torch_backend`):

    gram_dense(K, A, G, bias)          dense layer Gram, into K's lower triangle
    gram_seq(K, A, G, bias)            sequence layer Gram (ghost: no per-sample gradient stored)
    gram_embedding(K, tokens, G)       embedding Gram
    gram_per_sample(K, P)              Gram of per-sample gradient rows
    backproject(A, G, u, bias)         J̃ᵀu of a (sequence) linear layer
    backproject_embedding(tokens, G, u, num_embeddings)
    cholesky_solve(A, B)               SPD solve, (X, info)
    cholesky_batched(A)                per-matrix Cholesky of a batch, (L, info)
    eigh(A)                            symmetric eigendecomposition, (evals, evecs)

`Backend` itself is the torch backend (the reference, CPU and GPU); an accelerated backend
subclasses it, overrides the ops it implements, and registers itself with `register_backend`.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import torch_backend

__all__ = ["Backend", "register_backend", "get_backend", "available_backends", "AUTO_PREFERENCE"]


class Backend:
    """The op set. This base class is the torch reference implementation."""

    name = "torch"
    gram_dense = staticmethod(torch_backend.gram_dense)
    gram_seq = staticmethod(torch_backend.gram_seq)
    gram_embedding = staticmethod(torch_backend.gram_embedding)
    gram_per_sample = staticmethod(torch_backend.gram_per_sample)
    backproject = staticmethod(torch_backend.backproject)
    backproject_embedding = staticmethod(torch_backend.backproject_embedding)
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

# What backend="auto" picks, by device type: the first registered backend that supports the device.
AUTO_PREFERENCE: dict[str, list[str]] = {"cpu": ["torch"], "cuda": ["torch"]}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make `factory()` available as backend `name`."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def available_backends() -> list[str]:
    """Names of all registered backends."""
    return sorted(_REGISTRY)


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend `name` ("auto" resolves per device type) for tensors on `device`."""
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ["torch"]):
            if candidate in _REGISTRY:
                backend = get_backend(candidate, device)
                if backend.supports(device):
                    return backend
        return get_backend("torch", device)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()} or 'auto'")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    backend = _INSTANCES[name]
    if not backend.supports(device):
        raise ValueError(f"backend {name!r} does not support tensors on {device}")
    return backend


def _cuda_backend() -> Backend:
    """The CUDA extension backend (egn_fast._C); ImportError when the extension was not built."""
    from .cuda_backend import CudaBackend

    return CudaBackend()


register_backend("cuda", _cuda_backend)
