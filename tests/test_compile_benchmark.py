"""benchmarks/compile.py's timing loop, verdict and report on synthetic numbers (the real run
compiles with inductor for minutes; its results are committed in benchmarks/results/)."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark


def stage(ratio: float) -> dict:
    return {"eager": 1.0, "compiled": ratio, "eager_quartiles": [0.9, 1.1], "compiled_quartiles": [ratio, ratio],
            "ratio": ratio, "compile_s": 2.0, "rel_err": 1e-8}


def case(name: str, step_ratio: float, stage_ratios: tuple[float, float, float]) -> dict:
    row = {"eager": 10.0, "compiled": 10.0 * step_ratio, "eager_quartiles": [9.0, 11.0],
           "compiled_quartiles": [9.0, 11.0], "ratio": step_ratio}
    stages = {"m": 16, **dict(zip(("gram", "solve", "backproject"), map(stage, stage_ratios)))}
    return {"name": name, "model": {"first_compile_s": 3.0, "direction_rel_err": 0.0, "ms": {"EGN step": row}},
            "stages": stages}


def test_alternate_times_every_method_in_turn(monkeypatch):
    bench = load_benchmark("compile", monkeypatch)
    order = []
    ms = bench.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3 and [len(v) for v in ms.values()] == [3, 3]


@pytest.mark.parametrize("ratios,word", [((0.5, 0.8, 0.9), "pays on every stage"),
                                         ((1.2, 2.0, 1.1), "slows every stage"),
                                         ((0.5, 2.0, 1.0), "no consistent gain")])
def test_verdict_and_report(monkeypatch, tmp_path, ratios, word):
    bench = load_benchmark("compile", monkeypatch)
    cases = [case("mlp", 1.01, ratios), case("gpt", 0.98, ratios)]
    text = bench.verdict(cases)
    assert word in text and "1.01, 0.98" in text
    result = {"machine": {"cpu": "x", "torch_threads": 1, "torch": "2"}, "repeats": 3, "warmup": 1, "seconds": 1.0,
              "load": [1.0, 1.0], "cases": cases, "verdict": text}
    bench.write_markdown(tmp_path / "r.md", result)
    md = (tmp_path / "r.md").read_text()
    assert "| mlp | EGN step | 10.00 (9.00–11.00) | 10.10 (9.00–11.00) | 1.01 |" in md
    assert f"| gpt | 16 | solve | 1.000 (0.900–1.100) | {ratios[1]:.3f}" in md
