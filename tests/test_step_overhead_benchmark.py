"""benchmarks/step_overhead.py: the ratio and the verdict come from the timed calls, the report says them."""

from __future__ import annotations

import json
import sys
import time

from benchmark_scripts import load_benchmark


def test_ratio_and_verdict_follow_the_timed_calls(monkeypatch, tmp_path):
    bench = load_benchmark("step_overhead", monkeypatch)
    slow = bench.Case(
        "slow", "a call twice as slow as its baseline", 1.5,
        egn={"egn": lambda: time.sleep(0.004), "before": lambda: time.sleep(0.006)}, baseline=lambda: time.sleep(0.002),
        baseline_name="sleep",
        stages=lambda: {"gram": 0.003, "solve": 0.001}, calls=6,
    )
    result = bench.run_case(slow, quick=False)
    assert 1.6 < result["ratio"] < 2.6 and not result["met"]
    assert 2.5 < result["before_ratio"] < 3.6
    assert result["stages_ms"] == {"gram": 3.0, "solve": 1.0}
    info = {"cpu": "test cpu", "torch_threads": 1, "torch": "x", "reuse_cpu_memory": False, "before": "abc1234"}
    bench.write_report([result], info, tmp_path)
    md = (tmp_path / "step_overhead_cpu.md").read_text()
    assert "| a call twice as slow as its baseline |" in md and "**no**" in md and "≤ 1.5×" in md
    assert "egn_fast at abc1234" in md and f"{result['before_ratio']:.2f}× |" in md
    assert json.loads((tmp_path / "step_overhead_cpu.json").read_text())["cases"][0]["ratio"] == result["ratio"]


def test_a_real_case_runs_end_to_end_beside_another_tree(monkeypatch, tmp_path):
    """--before loads a second egn_fast (here this very tree, copied under another name) and times it
    in the same rounds."""
    bench = load_benchmark("step_overhead", monkeypatch)
    out = tmp_path / "out"
    assert bench.main(["--quick", "--threads", "1", "--only", "paper_mlp_direction", "--before", str(bench.REPO), "--out", str(out)]) == 0
    case = json.loads((out / "step_overhead_cpu.json").read_text())["cases"][0]
    assert case["case"] == "paper_mlp_direction" and case["egn_ms"] > 0 and case["baseline_ms"] > 0 and case["before_ms"] > 0
    assert {"forward", "gram", "solve", "backproject"} <= set(case["stages_ms"])
    monkeypatch.delitem(sys.modules, "egn_fast_before")
