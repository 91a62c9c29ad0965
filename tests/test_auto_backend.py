"""backend="auto": each op from the backend auto_table.json chooses for the device type, torch
(with a warning) where the chosen backend cannot be created or does not support the device."""

import json
import sys

import pytest
import torch

from egn_fast import ops
from egn_fast.ops import torch_backend

CPU = torch.device("cpu")


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Point the auto table at a temporary file; returns a function that writes its cpu entry."""
    path = tmp_path / "auto_table.json"
    monkeypatch.setattr(ops, "AUTO_TABLE_PATH", path)
    monkeypatch.setattr(ops, "_AUTO", {})

    def write(choices):  # the same choices for both device types
        path.write_text(json.dumps({"note": "test", "measured_on": None, "devices": {"cpu": choices, "cuda": choices}}))
        ops._AUTO.clear()

    return write


@pytest.fixture
def registered(monkeypatch):
    """Register extra backends for one test only."""
    monkeypatch.setattr(ops, "_REGISTRY", dict(ops._REGISTRY))
    monkeypatch.setattr(ops, "_INSTANCES", dict(ops._INSTANCES))
    return ops.register_backend


class Marked(ops.Backend):
    name = "marked"

    @staticmethod
    def gram_dense(K, A, G, bias):
        K.fill_(7.0)


def test_shipped_table_names_every_op_and_is_all_torch_until_measured():
    table = ops.auto_table()
    assert set(table) == {"cpu", "cuda"}
    for choices in table.values():
        assert all(callable(getattr(ops.Backend, op)) for op in choices)
        assert set(choices.values()) == {"torch"}
    assert ops.get_backend("auto", CPU).name == "torch"


def test_auto_takes_each_op_from_its_chosen_backend(table, registered):
    registered("marked", Marked)
    table({"gram_dense": "marked", "gram_seq": "torch"})
    auto = ops.get_backend("auto", CPU)
    assert auto.name == "auto" and auto.choices == {"gram_dense": "marked"}
    K = torch.zeros(2, 2)
    auto.gram_dense(K, torch.ones(2, 1), torch.ones(2, 1, 1), False)
    assert torch.equal(K, torch.full((2, 2), 7.0))
    assert auto.gram_seq is torch_backend.gram_seq and auto.cholesky_solve is torch_backend.cholesky_solve


def test_unavailable_choice_falls_back_to_torch_with_a_warning(table, registered):
    def missing_toolchain():
        raise ImportError("no module named 'fancy'")

    class GpuOnly(Marked):
        @staticmethod
        def supports(device):
            return device.type == "cuda"

    registered("fancy", missing_toolchain)
    registered("gpu_only", GpuOnly)
    table({"gram_dense": "fancy", "gram_seq": "gpu_only", "backproject": "never_registered"})
    with pytest.warns(UserWarning) as caught:
        auto = ops.get_backend("auto", CPU)
    messages = " | ".join(str(w.message) for w in caught)
    assert "no module named 'fancy'" in messages and "does not support tensors on cpu" in messages
    assert "unknown backend 'never_registered'" in messages
    assert auto.name == "torch"


def test_unknown_op_in_table_is_an_error(table):
    table({"gram_dence": "torch"})
    with pytest.raises(ValueError, match="unknown op 'gram_dence'"):
        ops.get_backend("auto", CPU)


def test_triton_is_registered_lazily(table, monkeypatch):
    """The triton backend is created on first use; a missing triton is an ImportError there and a
    warning plus torch under backend="auto"."""
    assert "triton" in ops.available_backends()
    table({"gram_dense": "triton"})
    monkeypatch.setattr(ops, "_INSTANCES", {})
    monkeypatch.setitem(sys.modules, "egn_fast.ops.triton_backend", None)  # import fails
    with pytest.raises(ImportError):
        ops.get_backend("triton", CPU)
    with pytest.warns(UserWarning, match="gram_dense on cpu uses torch, not 'triton'"):
        assert ops.get_backend("auto", CPU).name == "torch"


def test_auto_can_choose_triton_per_op(table):
    pytest.importorskip("triton", reason="triton is not installed")
    from egn_fast import triton_kernels

    table({"gram_dense": "triton"})
    auto = ops.get_backend("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert auto.choices == {"gram_dense": "triton"}
    assert auto.gram_dense is triton_kernels.gram_dense and auto.gram_seq is torch_backend.gram_seq
