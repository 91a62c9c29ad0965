"""benchmarks/convergence.py and benchmarks/datasets.py on small generated data (no dataset files
needed): loaders in the files' formats, the tuning protocol, the summary and the report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import convergence  # noqa: E402
import convergence_report  # noqa: E402
import datasets  # noqa: E402
import lqr  # noqa: E402

from egn_fast import EGN, SGN  # noqa: E402
from egn_fast.cli.training import Dataset  # noqa: E402


def write_diamonds(path: Path, n: int, rng: np.random.Generator) -> None:
    np.savez(
        path,
        carat=rng.uniform(0.2, 3, n), depth=rng.normal(61, 1, n), table=rng.normal(57, 2, n),
        x=rng.uniform(4, 9, n), y=rng.uniform(4, 9, n), z=rng.uniform(2, 5, n),
        cut=rng.choice(["Fair", "Good", "Ideal"], n), color=rng.choice(list("DEFG"), n),
        clarity=rng.choice(["SI1", "VS1"], n), price=rng.integers(300, 19000, n),
    )


def test_diamonds_one_hot_standardized_split(tmp_path):
    write_diamonds(tmp_path / "diamonds.npz", 400, np.random.default_rng(1))
    data = datasets.diamonds(tmp_path, test_fraction=0.1, seed=3)
    assert data.X_train.shape == (360, 6 + 3 + 4 + 2) and data.X_test.shape == (40, 15)
    assert data.y_train.shape == (360, 1) and data.task == "regression"
    X = data.X_train.double()
    assert X.mean(0).abs().max() < 1e-5 and (X.std(0, unbiased=False) - 1).abs().max() < 1e-4
    # each categorical block is one-hot before standardization: exactly one column per block is
    # above its column mean in a row (the row's own category)
    cut = X[:, 6:9]
    assert torch.equal((cut > 0).sum(1), torch.ones(360, dtype=torch.int64))


def test_missing_file_names_the_file_and_arrays(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"diamonds\.npz.*carat"):
        datasets.diamonds(tmp_path)
    np.savez(tmp_path / "fashion_mnist.npz", X_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="lacks arrays"):
        datasets.fashion_mnist(tmp_path)


def test_fashion_mnist_keeps_the_official_split(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "fashion_mnist.npz",
             X_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 50),
             X_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 20))
    data = datasets.fashion_mnist(tmp_path)
    assert data.X_train.shape == (50, 784) and data.X_test.shape == (20, 784) and data.num_outputs == 10
    raw = np.load(tmp_path / "fashion_mnist.npz")
    assert torch.equal(data.y_test, torch.tensor(raw["y_test"], dtype=torch.int64))
    assert data.X_train.double().mean(0).abs().max() < 1e-5


def reviews(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(1500)]
    return np.array([" ".join(rng.choice(vocab, 40)) for _ in range(n)])


def test_review_features_fit_on_training_rows_only(tmp_path):
    texts = reviews(700, 4)
    train_rows = np.arange(100, 700)
    X = datasets.review_features(texts, train_rows, dims=300)
    other = texts.copy()
    other[:100] = reviews(100, 5)  # change only the held-out reviews
    X_other = datasets.review_features(other, train_rows, dims=300)
    assert X.shape == (700, 300)
    np.testing.assert_allclose(X_other[100:], X[100:], atol=1e-10)  # no leakage into training rows
    assert not np.allclose(X_other[:100], X[:100])


def test_womens_reviews_cache_round_trip(tmp_path):
    labels = np.random.default_rng(6).integers(0, 2, 700)
    np.savez(tmp_path / "womens_reviews.npz", text=reviews(700, 7), recommended=labels)
    first = datasets.womens_reviews(tmp_path, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("womens_reviews_*.npy"))) == 1
    second = datasets.womens_reviews(tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(first.X_train, second.X_train) and first.X_train.shape == (630, 300)
    assert first.num_outputs == 2


def synthetic_task(steps: int = 24) -> convergence.Task:
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(400, 5, generator=gen)
    y = (X[:, :1] * X[:, 1:2] + torch.sin(X[:, 2:3])) + 0.1 * torch.randn(400, 1, generator=gen)
    data = Dataset("toy", "regression", X[:320], y[:320], X[320:], y[320:], 1)

    def model(data: Dataset, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    return convergence.Task("toy", "toy regression", lambda d: data, model, "test MSE", convergence.test_mse,
                            False, target=0.9, batch_size=32, steps=steps, full_steps=steps)


def test_tuning_picks_the_best_validation_point_and_summary_matches_runs(tmp_path):
    task = synthetic_task()
    specs = [
        convergence.OptimizerSpec("egn", "EGN", convergence.OPTIMIZERS["egn"].make, [{"damping": 1e-2}, {"damping": 10.0}]),
        convergence.OptimizerSpec("sgd", "SGD", convergence.OPTIMIZERS["sgd"].make, [{"lr": 1e-3}, {"lr": 1e9}]),
    ]
    result = convergence.run_task(task, specs, task.steps, (0, 1), tmp_path, torch.device("cpu"))
    for spec in specs:
        tuning = [r for r in result["runs"] if r.optimizer == spec.name and r.split == "validation"]
        assert [r.point for r in tuning] == spec.grid
        best = min(tuning, key=lambda r: r.final(False))
        assert result["chosen"][spec.name] == best.point
    # lr 1e9 blows SGD up: flagged as diverged and never chosen
    diverged = [r for r in result["runs"] if r.diverged]
    assert diverged and all(r.point == {"lr": 1e9} and r.best(False) == r.final(False) == math.inf for r in diverged)
    assert result["chosen"]["sgd"] == {"lr": 1e-3}

    entry = convergence.task_report(task, result, tmp_path / "toy.png")
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in entry["summary"]:
        runs = [r for r in result["runs"] if r.optimizer == row["optimizer"] and r.split == "test"]
        assert len(runs) == row["seeds"] == 2
        finals = [r.history.test_metric[-1] for r in runs]
        assert math.isclose(row["final"][0], sum(finals) / 2, rel_tol=1e-12)
        assert math.isclose(row["best"][0], sum(min(r.history.test_metric) for r in runs) / 2, rel_tol=1e-12)
        rates = [r.history.steps[-1] / r.history.train_seconds for r in runs]
        assert math.isclose(row["steps_per_s"], sum(rates) / 2, rel_tol=1e-12)
    egn_runs = [r for r in result["runs"] if r.optimizer == "egn" and r.split == "test"]
    assert all(r.history.test_metric[-1] < r.history.test_metric[0] for r in egn_runs)  # it trains

    report = {"machine": {"cpu": "test", "torch_threads": 1, "torch": torch.__version__},
              "settings": {"device": "cpu", "seeds": [0, 1]}, "tasks": [entry]}
    text = convergence.markdown(report)
    assert "| egn |" in text and "| sgd |" in text and entry["verdict"] in text


def test_tuning_ranks_by_the_final_metric_not_the_peak():
    # a run that peaks early and then collapses loses to a steady one
    history = lambda metric: convergence.History("egn", [0, 1, 2], [0.0, 1.0, 2.0], [1.0] * 3, metric)  # noqa: E731
    collapsing = convergence.Run("toy", "egn", {}, 0, "validation", history([0.5, 0.9, 0.3]))
    steady = convergence.Run("toy", "egn", {}, 0, "validation", history([0.5, 0.7, 0.8]))
    assert collapsing.best(True) > steady.best(True)
    assert steady.final(True) > collapsing.final(True)


def test_grid_edges_flag_values_at_the_ends_of_their_axis():
    grid = convergence._points(damping=[0.1, 1.0, 10.0], momentum=[0.5, 0.9])
    assert convergence_report.grid_edges(grid, {"damping": 1.0, "momentum": 0.5}) == ["momentum"]
    assert convergence_report.grid_edges(grid, {"damping": 10.0, "momentum": 0.9}) == ["damping", "momentum"]
    assert convergence_report.grid_edges([{"lr": 1.0}], {"lr": 1.0}) == []  # a single value is no edge


@pytest.mark.parametrize("egn_final, other_final, outcome", [
    ((0.20, 0.01), (0.25, 0.01), "EGN wins"),
    ((0.30, 0.01), (0.25, 0.01), "EGN loses"),
    ((0.251, 0.004), (0.25, 0.001), "EGN ties"),  # |Δ| = 0.001 ≤ max std 0.004
])
def test_verdict_wins_loses_or_ties_by_the_seed_spread(egn_final, other_final, outcome):
    task = synthetic_task()  # test MSE, lower is better
    row = lambda name, final, t: {"optimizer": name, "final": final, "time_to_target": t}  # noqa: E731
    text = convergence_report.verdict(task, [row("egn", egn_final, 2.0), row("adam", other_final, 1.0)])
    assert outcome in text
    assert "First to the target 0.9000 in wall time: adam (1.00 s); EGN's first: egn (2.00 s)." in text
    text = convergence_report.verdict(task, [row("egn", egn_final, None), row("adam", other_final, 1.0)])
    assert "no EGN variant reached it" in text


def test_time_to_target_is_the_first_crossing():
    task = synthetic_task()
    run = convergence.Run("toy", "egn", {}, 0, "test", convergence.History("egn", [0, 5, 10, 15], [0.0, 1.0, 2.0, 3.0],
                                                                            [1.0] * 4, [2.0, 0.95, 0.85, 0.5]))
    assert convergence_report.time_to_target(run, task) == 2.0
    run.history.test_metric = [2.0, 1.5, 1.2, 1.0]
    assert convergence_report.time_to_target(run, task) is None


def test_every_grid_point_builds_its_optimizer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for spec in convergence.OPTIMIZERS.values():
        for point in spec.grid:
            opt = spec.make(model, "cross_entropy", **point)
            assert isinstance(opt, torch.optim.Optimizer)
            if spec.name.startswith("egn"):
                assert isinstance(opt, EGN) and opt.damping == point["damping"]
            if spec.name == "sgn":
                assert isinstance(opt, SGN)


def test_lqr_metric_is_the_gain_error_to_the_riccati_gain():
    policy = lqr.LinearPolicy(convergence.LQR_PROBLEM, seed=3)
    want = np.linalg.norm(policy.gain.weight.detach().double().numpy() - convergence.LQR_PROBLEM.K_star) / np.linalg.norm(
        convergence.LQR_PROBLEM.K_star)
    assert math.isclose(convergence.lqr_gain_error(policy, None, None), want, rel_tol=1e-6)


def test_bench_command_needs_the_checkout(tmp_path, monkeypatch):
    from egn_fast.cli import command as cli

    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "benchmarks")
    with pytest.raises(SystemExit, match="source checkout"):
        cli.main(["bench", "--out", str(tmp_path / "out")])


def test_jittered_solves_are_counted_not_printed(recwarn):
    # λ = 0 and a 6-parameter linear model: K = J̃J̃ᵀ (32 × 32) has rank ≤ 6, so every Cholesky
    # needs the jitter retry; the run records each one instead of warning.
    task = synthetic_task(steps=5)
    task.model = lambda data, seed: nn.Linear(5, 1)
    spec = convergence.OptimizerSpec("egn", "EGN", convergence.OPTIMIZERS["egn"].make, [{"damping": 0.0}])
    data = task.load(Path("."))
    run = convergence.train_run(task, spec, {"damping": 0.0}, data, "test", 0, task.steps, torch.device("cpu"), lambda k: None)
    assert run.diverged is None and run.jittered_solves == task.steps
    assert not [w for w in recwarn if "jitter" in str(w.message)]


def test_quick_run_verdict_and_header_say_what_was_run():
    task = synthetic_task()
    row = lambda name, final, t: {"optimizer": name, "final": final, "time_to_target": t}  # noqa: E731
    text = convergence_report.verdict(task, [row("egn", (0.20, 0.0), 2.0), row("adam", (0.25, 0.0), 1.0)], quick=True)
    assert "EGN ahead in this smoke run (one grid point per optimizer, untuned" in text and "wins" not in text
    report = {"machine": {"cpu": "x", "torch_threads": 1, "torch": "t"}, "settings": {"device": "cpu", "seeds": [0], "quick": True},
              "tasks": []}
    header = convergence_report.markdown(report)
    assert "Quick smoke run: one grid point per optimizer, untuned" in header and "tuned on its grid" not in header


def test_data_directory_comes_from_the_argument_or_egn_fast_data_only(tmp_path, monkeypatch):
    write_diamonds(tmp_path / "diamonds.npz", 50, np.random.default_rng(2))
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    assert datasets.diamonds().X_train.shape == (45, 15)  # found through EGN_FAST_DATA
    monkeypatch.delenv(datasets.DATA_ENV)
    with pytest.raises(datasets.DataMissing) as missing:
        datasets.diamonds()
    assert str(missing.value) == (
        "diamonds.npz not found (no --data-dir given and EGN_FAST_DATA is not set): put diamonds.npz (arrays carat, depth, "
        "table, x, y, z, cut, color, clarity, price) into a directory and pass --data-dir DIR or set EGN_FAST_DATA=DIR "
        "(sources: benchmarks/README.md, 'Data')")


def test_california_without_file_or_network_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    import sklearn.datasets

    def offline(**kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", offline)
    with pytest.raises(datasets.DataMissing, match=rf"^california_housing.npz not found in {tmp_path}: .*; scikit-learn's "
                                                   r"fetch_california_housing failed too \(<urlopen error no network>\)$"):
        datasets.california_housing(tmp_path)
    with pytest.raises(SystemExit, match="^convergence.py: california_housing.npz not found"):
        convergence.main(["--quick", "--tasks", "california_housing", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
