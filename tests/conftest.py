import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels run under the interpreter on CPU tensors. triton.jit reads
# this when it decorates a kernel, so it must be set before anything imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
