"""Triton kernels for the row-space ops (installed as `egn_fast.triton_kernels`).

Each takes the same arguments as its op in `egn_fast.ops.torch_backend`. Importing this package
imports triton (ImportError when it is missing); set TRITON_INTERPRET=1 before that to run the
kernels on CPU tensors.
"""

from .backproject import backproject
from .gram_dense import gram_dense
from .gram_seq import gram_seq

__all__ = ["gram_dense", "gram_seq", "backproject"]
