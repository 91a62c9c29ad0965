"""benchmarks/seq_method.py on a tiny grid: ghost and per-sample Grams agree (with each other and
with a float64 Gram of explicit per-sample gradients), the skip rule, and the report's fields."""

import json

import pytest
import torch

from benchmark_scripts import load_benchmark

TINY = [(2, 1, 3, 5, 4), (3, 2, 4, 6, 7), (2, 3, 5, 4, 3)]  # (b, s, T, in, out)


@pytest.fixture
def bench(monkeypatch):
    return load_benchmark("seq_method", monkeypatch)


def explicit_gram(weight, bias, A, G):
    """K = P Pᵀ from per-sample gradients [Σ_t G_ik,t a_i,tᵀ, Σ_t G_ik,t] in float64."""
    b, s = G.shape[:2]
    dW = torch.einsum("bsto,bti->bsoi", G.double(), A.double()).reshape(b * s, -1)
    db = G.double().sum(2).reshape(b * s, -1)
    P = torch.cat([dW, db], 1)
    return P @ P.T


@pytest.mark.parametrize("point", TINY)
def test_both_methods_give_the_explicit_gram(bench, point):
    layer = bench.make_layer(*point)
    want = explicit_gram(*layer)
    for method in bench.METHODS:
        got = bench.gram_fn(method, *layer)()
        assert bench.rel_err(got, want) < 1e-5, method


def test_tiny_grid_report(bench, tmp_path):
    points = bench.run_grid(TINY, repeats=2)
    skipped = bench.measure_point(2, 2, 4, 8, 8, repeats=1, max_bytes=0)
    assert skipped["status"].startswith("skipped: ghost temporaries would be") and "per-sample gradients" in skipped["status"]
    assert "median_ms" not in skipped and skipped["choice"] in bench.METHODS
    for p, (b, s, T, n_in, n_out) in zip(points, TINY):
        assert p["status"] == "measured" and (p["b"], p["s"], p["T"], p["in"], p["out"]) == (b, s, T, n_in, n_out)
        assert p["agree"] and p["rel_err"] < 1e-5
        assert p["choice"] == bench.choose_seq_method(b, s, T, n_in, n_out)
        t = p["median_ms"]
        assert set(t) == set(bench.METHODS) and all(v > 0 for v in t.values())
        assert p["fastest"] == min(t, key=t.get) and p["right"] == (p["choice"] == p["fastest"])
        assert p["slowdown"] == pytest.approx(t[p["choice"]] / min(t.values())) and p["slowdown"] >= 1.0
        assert (p["slowdown"] == 1.0) == p["right"]
        assert all(1 <= n <= 2 for n in p["timed_calls"].values())
    report = bench.build_report(points + [skipped], {"repeats": 2, "call_budget_s": 1.0, "slow_s": 5.0,
                                                     "load_average_1_5_15_min": {"before": [0, 0, 0], "after": [0, 0, 0]}}, 0.1)
    md = bench.write_report(report, tmp_path / "seq")
    data = json.loads((tmp_path / "seq.json").read_text())
    assert {"machine", "settings", "run_s", "summary", "element_cost_scan", "points"} <= set(data)
    sm = data["summary"]
    assert (sm["points"], sm["measured"], sm["skipped"]) == (4, 3, 1) and sm["all_agree"]
    assert sm["model"]["right"] + sm["model"]["wrong"] == 3
    assert sm["model"]["right"] == sum(p["right"] for p in points)
    assert data["element_cost_scan"][0]["element_cost"] == 0 and data["element_cost_scan"][0]["right"] == sm["model"]["right"]
    for field in ("median_ms", "choice", "fastest", "right", "slowdown", "rel_err", "model_macs"):
        assert all(field in p for p in data["points"][:3]), field
    assert (tmp_path / "seq.md").read_text() == md
    assert md.count("\n| 2 | 1 | 3 | 5→4 |") == 1 and "**Verdict.** The cost model picks the faster method at" in md
    assert "Skipped:" in md and "- b=2 s=2 T=4 8→8: skipped:" in md
