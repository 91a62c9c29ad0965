"""benchmarks/step_time_sweep.py on tiny sizes (random data, no dataset file): directions against
the float64 oracle, peak memory, ratios, skip rules, the markdown and the plot."""

import json

import pytest
import torch

from benchmark_scripts import load_benchmark
from oracle import dense_direction

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench(monkeypatch):
    module = load_benchmark("step_time_sweep", monkeypatch)
    monkeypatch.setattr(module, "CALL_BUDGET_S", 0.02)  # MIN_REPEATS calls per method
    return module


@pytest.fixture
def methods(monkeypatch):
    return load_benchmark("step_time_methods", monkeypatch)


def tiny_pool(n: int = 8, features: int = 784) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def settings() -> dict:
    return {"model": "MLP 784-16-16-c tanh", "data": "random", "damping": 1.0, "repeats": 3,
            "call_budget_s": 0.02, "rounds": 3, "reuse_cpu_memory": False, "somax": None}


def test_sweep_measures_checks_and_reports(bench, tmp_path):
    X, y = tiny_pool()
    points = bench.run_sweep(X, y, "random", [4, 8], [3], (16, 16), repeats=3, warmup=1)
    assert [(p["b"], p["c"], p["m"]) for p in points] == [(4, 3, 8), (8, 3, 16)]  # s = c − 1
    somax_absent = bench.somax_missing() is not None
    for p in points:
        meth = p["methods"]
        assert set(meth) == set(bench.SWEEP_METHODS) and p["oracle"]["computed"]
        measured = {k for k, v in meth.items() if v["status"] == "measured"}
        assert measured >= {"egn", "egn_step", "sgd", "adam", "matJ"}
        assert meth["egn"]["rel_err"] < 1e-5 and meth["matJ"]["rel_err"] < 1e-5
        assert meth["egn_step"]["rel_err"] < 1e-4  # θ' − θ in float32
        assert meth["sgd"]["rel_err"] is None and meth["adam"]["rel_err"] is None
        for k in measured:
            assert type(meth[k]["peak_bytes"]) is int and meth[k]["peak_bytes"] >= 0, (k, meth[k]["peak_bytes"])
            assert meth[k]["timed_calls"] >= bench.MIN_REPEATS and meth[k]["median_ms"] > 0
        # Methods that keep nothing between calls allocate fresh pages every call. (An SGD/Adam step
        # on this tiny net may read 0: zero_grad frees the last step's .grad and backward reuses
        # those resident pages for the new one.)
        for k in measured - {"sgd", "adam"}:
            assert meth[k]["peak_bytes"] > 0, (k, meth[k]["peak_bytes"])
        med = {k: meth[k]["median_ms"] for k in measured}
        assert {"egn_over_sgd", "egn_over_adam", "matJ_over_egn", "egn_step_over_sgd"} <= set(p["ratios"])
        for name, ratio in p["ratios"].items():
            a, b = name.split("_over_")
            assert ratio == pytest.approx(med[a] / med[b], rel=1e-12)
        if somax_absent:
            assert meth["somax"]["status"].startswith("somax: not installed, not measured")

    report = bench.sweep_report(points, settings())
    md = bench.write_sweep(report, tmp_path / "sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "sweep.json").read_text())["points"][1]["ratios"] == points[1]["ratios"]
    assert (tmp_path / "sweep.md").read_text() == md
    header = "| b | m | " + " | ".join(bench.SWEEP_METHODS) + " |"
    assert md.count(header) == 3 and all(f"`{k}` = {bench.METHOD_LABELS[k]}" in md for k in bench.SWEEP_METHODS)
    r = points[1]["ratios"]
    assert f"At b=8, c=3: egn_fast direction = {r['egn_over_sgd']:.1f}× an SGD step" in md
    assert f"= {r['egn_over_adam']:.1f}× an Adam step" in md
    if somax_absent:
        assert "somax not installed, not measured" in md and "somax: not installed, not measured." in md


def test_skip_rules(bench, monkeypatch, tmp_path):
    """matJ and the oracle over their memory budgets, and the per-call time cap for larger b."""
    monkeypatch.setattr(bench, "MATJ_MAX_BYTES", 0)
    monkeypatch.setattr(bench, "ORACLE_MAX_BYTES", 0)
    monkeypatch.setattr(bench, "MAX_CALL_S", 0.0)
    X, y = tiny_pool(features=16)
    small, large = bench.run_sweep(X, y, "random", [8, 4], [2], (4,), repeats=3, warmup=0)
    assert (small["b"], large["b"]) == (4, 8)
    assert small["methods"]["matJ"]["status"].startswith("skipped: J would be")
    assert small["oracle"] == {"computed": False, "reason": small["oracle"]["reason"]}
    assert small["oracle"]["reason"].startswith("skipped: float64 J would be")
    assert small["methods"]["egn"]["status"] == "measured" and small["methods"]["egn"]["rel_err"] is None
    for k in ("egn", "egn_step", "sgd", "adam"):  # every median exceeded the 0 s cap at b=4
        assert large["methods"][k]["status"].startswith("skipped: ") and "at b=4 (> 0 s cap)" in large["methods"][k]["status"]
    assert large["ratios"] == {}
    md = bench.write_sweep(bench.sweep_report([small, large], settings()), tmp_path / "sweep")
    assert "At b=8, c=2: egn_fast not measured" in md and "- b=4: matJ: skipped: J would be" in md
    assert "- b=4: oracle skipped: float64 J would be" in md
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_oracle_matches_the_dense_lm_solve(bench, methods):
    """The row-space float64 oracle equals tests/oracle.py's d × d solve of (H + λI)d = −g."""
    X, y = tiny_pool(6, 5)
    case = bench.sweep_case(X, y, 6, 4, (7,), "random")
    got = bench.oracle_direction(case, *bench.oracle_loss_factor(case))
    want = dense_direction(case.model, case.inputs, case.targets, methods.resolve_loss("cross_entropy"), bench.DAMPING)
    assert bench.rel_err(got, want) < 1e-10


def test_peak_rss_increase_sees_a_fresh_allocation(bench):
    peak = bench.peak_rss_increase(lambda: torch.ones(50_000_000 // 4))  # 50 MB, every page written
    if peak is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 50_000_000 <= peak < 80_000_000


def test_somax_wiring_matches_its_own_formula(bench, methods):
    """Where somax is installed: make_somax's direction is somax's formula on our network and batch
    (J̃ = L·J with Q + 1e-6·I = LLᵀ), so its rel err against the LM oracle is somax's, not ours."""
    if bench.somax_missing():
        pytest.skip("somax (python-somax) is not installed")
    X, y = tiny_pool(32, 784)
    case = bench.sweep_case(X, y, 32, 10, (32, 32), "random")
    _, direction = methods.make_somax(case)
    f = case.model(case.inputs).detach().double()
    p = f.softmax(1)
    r = p - torch.nn.functional.one_hot(case.targets, 10).double()
    L = torch.linalg.cholesky(torch.diag_embed(p) - p[:, :, None] * p[:, None, :] + 1e-6 * torch.eye(10, dtype=torch.float64))
    want = bench.oracle_direction(case, L.mT, torch.linalg.solve(L.mT, r[..., None])[..., 0])
    assert bench.rel_err(direction(), want) < 1e-3
