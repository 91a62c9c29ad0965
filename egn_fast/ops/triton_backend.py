"""The triton backend: fused Triton kernels for gram_dense, gram_seq and backproject; every other
op is the torch backend's. Importing this module imports triton (ImportError when missing)."""

from __future__ import annotations

import torch

from .. import triton_kernels
from ..triton_kernels import _common
from . import Backend


class TritonBackend(Backend):
    name = "triton"
    gram_dense = staticmethod(triton_kernels.gram_dense)
    gram_seq = staticmethod(triton_kernels.gram_seq)
    backproject = staticmethod(triton_kernels.backproject)

    @staticmethod
    def supports(device: torch.device) -> bool:
        """CUDA tensors, or CPU tensors when the kernels run under the Triton interpreter."""
        return device.type == "cuda" or (device.type == "cpu" and _common.INTERPRET)
