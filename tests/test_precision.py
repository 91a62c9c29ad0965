"""The one TF32 rule both GPU backends follow (egn_fast.ops.precision.tf32_allowed), under both of
torch's APIs: the legacy `torch.backends.cuda.matmul.allow_tf32` and (torch ≥ 2.9) `fp32_precision`.
Reading the legacy flag after the new API was used raises in torch; the rule must not."""

import pytest
import torch

from egn_fast.ops import precision

matmul = torch.backends.cuda.matmul
NEW_API = hasattr(matmul, "fp32_precision")


@pytest.fixture(autouse=True)
def restore_tf32_settings():
    """Leave torch's switches as they were (through the legacy flag, which resets both APIs)."""
    legacy = precision.tf32_allowed()
    global_precision = torch.backends.fp32_precision if NEW_API else None
    yield
    if NEW_API:
        torch.backends.fp32_precision = global_precision
    matmul.allow_tf32 = legacy


@pytest.mark.parametrize("allow", [True, False])
def test_legacy_api(allow):
    matmul.allow_tf32 = allow
    assert precision.tf32_allowed() is allow


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision API")
@pytest.mark.parametrize("setting, expected", [("tf32", True), ("ieee", False)])
def test_new_api(setting, expected):
    matmul.fp32_precision = setting
    if setting == "tf32":
        with pytest.raises(RuntimeError):  # what the old cuda-backend rule ran into
            matmul.allow_tf32
    assert precision.tf32_allowed() is expected


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision API")
@pytest.mark.parametrize("global_setting, expected", [("tf32", True), ("ieee", False)])
def test_new_api_inherits_the_global_setting(global_setting, expected):
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = global_setting
    assert precision.tf32_allowed() is expected


def test_both_gpu_backends_use_this_rule():
    pytest.importorskip("triton")
    from egn_fast.triton_kernels import _common

    assert _common.tf32_allowed is precision.tf32_allowed
    matmul.allow_tf32 = True
    assert _common.operand(torch.empty(1), torch.float32)[1] == "tf32"
    matmul.allow_tf32 = False
    assert _common.operand(torch.empty(1), torch.float32)[1] == "ieee"
    try:
        from egn_fast.ops import cuda_backend
    except ImportError:  # egn_fast._C not built here
        return
    assert cuda_backend.tf32_allowed is precision.tf32_allowed
