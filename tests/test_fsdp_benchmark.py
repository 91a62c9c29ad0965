"""benchmarks/fsdp.py --quick: a tiny GPT-2 sharded on 2 gloo ranks; the report's counts and fields."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmark_scripts import BENCHMARKS, load_benchmark

EGN_STAGES = [  # what an EGN step on a sharded GPT-2 must send (each > 0)
    "FSDP param all-gather, forward", "FSDP param all-gather, gradient backward", "FSDP param all-gather, batched/other backward",
    "FSDP grad reduce-scatter, gradient backward", "egn: factor all-gather (layer factors / rows + loss head)",
]


def test_quick_run_writes_a_consistent_report(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "fsdp.py"), "--quick", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "fsdp_cpu.json").read_text())
    assert (tmp_path / "fsdp_cpu.md").read_text().startswith("# EGN on an FSDP2-sharded GPT-2")
    assert (tmp_path / "fsdp_projection.png").stat().st_size > 1000
    assert report["worlds"] == [2] and {r["mode"] for r in report["runs"]} == {"adamw_sharded", "egn_sharded", "egn_replicated"}

    # AdamW's counted bytes: the analytic FSDP formula, recomputed here from the parameter shapes
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ranks = load_benchmark("fsdp_ranks", monkeypatch)
    adamw = next(r for r in report["runs"] if r["mode"] == "adamw_sharded")
    shapes = ranks.parameter_shapes(ranks.Config(**report["config"]))
    assert shapes["params"] == report["params"]
    R, f32 = 2, 4
    root, blocks = ranks.padded_numel(shapes["root"], R), ranks.padded_numel(shapes["blocks"], R)
    assert adamw["stages"] == {
        "FSDP param all-gather, forward": (R - 1) * (root + blocks) * f32 // R,
        "FSDP param all-gather, batched/other backward": (R - 1) * blocks * f32 // R,
        "FSDP grad reduce-scatter, batched/other backward": (R - 1) * (root + blocks) * f32 // R,
    }
    assert adamw["bytes"] == sum(adamw["stages"].values())

    egn = next(r for r in report["runs"] if r["mode"] == "egn_sharded")
    for stage in EGN_STAGES:
        assert egn["stages"].get(stage, 0) > 0, stage
    # EGN runs FSDP's all-gather three times (forward, gradient backward, batched backward)
    assert egn["stages"]["FSDP param all-gather, gradient backward"] == adamw["stages"]["FSDP param all-gather, forward"]
    assert egn["bytes"] == sum(egn["stages"].values()) > adamw["bytes"]
    for run in report["runs"]:
        assert run["step_s"] > 0 and run["peak_rss_mib"] > 0 and len(run["peak_rss_mib_ranks"]) == 2
    assert report["projection"]["rows"] and all(r["egn_comm_s"] > 0 and r["compute_s"] > 0 for r in report["projection"]["rows"])


def test_counter_converts_calls_to_ring_bytes(monkeypatch):
    """sent_bytes by the ring formulas, on a fake 4-rank group."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    count = load_benchmark("collective_count", monkeypatch)
    monkeypatch.setattr(count, "group_size", lambda group: 4)
    t = torch.zeros(10, 3)  # 120 bytes
    assert count.sent_bytes("gather_io", 2, (torch.zeros(40, 3), t), {}) == 3 * 120
    assert count.sent_bytes("gather_list", 2, ([t] * 4, t), {}) == 3 * 120
    assert count.sent_bytes("reduce", 2, (t,), {}) == 2 * 3 * 120 // 4
    assert count.sent_bytes("scatter_io", 3, (torch.zeros(10, 3), torch.zeros(40, 3)), {}) == 3 * 480 // 4
    assert count.sent_bytes("a2a", 4, (torch.zeros(40, 3), torch.zeros(40, 3)), {}) == 3 * 480 // 4
    assert count.sent_bytes("f_gather", 2, (t, 0, None), {}) == 3 * 120
