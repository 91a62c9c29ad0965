"""benchmarks/kernels.py without a GPU: its measuring loop on tiny shapes (Triton interpreter,
wall-clock timing), its tables and its auto-table writer."""

import json
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark

pytest.importorskip("triton", reason="triton is not installed")



@pytest.fixture
def bench(monkeypatch):
    module = load_benchmark("kernels", monkeypatch)
    if not torch.cuda.is_available():
        monkeypatch.setattr(module, "DEVICE", "cpu")
    monkeypatch.setattr(module, "GRAM_DENSE_QUICK", [(6, 2, 5, 7)])
    monkeypatch.setattr(module, "GRAM_SEQ_QUICK", [(3, 1, 4, 5, 3)])
    monkeypatch.setattr(module, "BACKPROJECT_QUICK", [(4, 2, 3, 5, 6)])
    monkeypatch.setattr(module, "MODES", {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False)})
    return module


def test_measure_tables_and_auto_table(bench, tmp_path):
    rows = bench.measure(quick=True, reps=1)
    assert {(r["op"], r["mode"], r["backend"]) for r in rows} >= {(op, mode, "triton") for op in bench.OPS for mode in ("fp32", "bf16")}
    assert all(r["rel_err"] < 1e-5 and r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    md = bench.markdown(rows, "test")
    assert md.count("| gram_seq |") == 2 and "Median speed-up over torch" in md

    # the table picks the fastest backend per op only when it beats torch clearly
    fake = [dict(r, speedup=2.0 if r["op"] == "gram_dense" else 1.01) for r in rows]
    assert bench.auto_choices(fake) == {"gram_dense": "triton", "gram_seq": "torch", "backproject": "torch"}
    path = tmp_path / "auto_table.json"
    shipped = json.loads(Path(bench.REPO / "egn_fast" / "ops" / "auto_table.json").read_text())
    path.write_text(json.dumps(shipped))
    written = bench.write_auto_table(fake, "Test GPU", path)
    assert json.loads(path.read_text()) == written
    assert written["devices"]["cuda"]["gram_dense"] == "triton" and written["devices"]["cuda"]["cholesky_solve"] == "torch"
    assert written["devices"]["cpu"] == shipped["devices"]["cpu"] and written["measured_on"] == "Test GPU"
    assert bench.gpu_slug("NVIDIA H200 (141GB)") == "nvidia_h200__141gb"
