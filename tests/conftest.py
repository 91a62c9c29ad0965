import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels run under the interpreter on CPU tensors. triton.jit reads
# this when it decorates a kernel, so it must be set before anything imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (then the session's count again): tiny networks gain nothing
    from a second thread, and on a busy machine one that waits for a core makes each step of a
    small EGN 10–50× slower (the DQN and demo tests train many small runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
