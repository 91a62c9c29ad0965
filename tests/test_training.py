"""Training on real data (scikit-learn's bundled sets) and the `egn-fast` command end to end."""

import json

import numpy as np
import pytest
from sklearn import datasets

from egn_fast import cli
from egn_fast.cli import training


@pytest.mark.parametrize("name, steps, margin", [("diabetes", 300, 0.75), ("digits", 40, 0.25)])
def test_egn_reaches_lower_training_loss_than_sgd_and_adam(name, steps, margin):
    """Same network init, same batches, same step count; Adam and SGD at torch's default lr."""
    data = training.sklearn_dataset(name)
    final = {opt: training.train(data, opt, steps, eval_every=steps).train_loss for opt in training.OPTIMIZERS}
    assert len({v[0] for v in final.values()}) == 1  # the same starting network
    best_other = min(final["adam"][-1], final["sgd"][-1])
    assert final["egn"][-1] < margin * best_other, final


def test_prepare_standardizes_with_the_training_split():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 5.0, size=(50, 3))
    y = rng.normal(-2.0, 4.0, size=50)
    data = training.prepare("synthetic", X, y, "regression", test_fraction=0.2, seed=1)
    assert data.X_train.shape == (40, 3) and data.X_test.shape == (10, 3) and data.y_train.shape == (40, 1)
    assert np.allclose(data.X_train.mean(0).numpy(), 0, atol=1e-5) and np.allclose(data.X_train.std(0, unbiased=False).numpy(), 1, atol=1e-5)
    assert abs(float(data.y_train.mean())) < 1e-5
    labels = training.prepare("c", X, np.array(["a", "b"] * 25), "classification")
    assert labels.num_outputs == 2 and set(labels.y_train.tolist()) <= {0, 1}


@pytest.mark.parametrize(
    "X, y, task, match",
    [
        (np.ones((10, 2)), np.ones(9), "regression", "need X"),
        (np.full((10, 2), np.nan), np.ones(10), "regression", "nan"),
        (np.random.default_rng(0).normal(size=(10, 2)), np.ones(10), "classification", "2 classes"),
        (np.random.default_rng(0).normal(size=(10, 2)), np.ones(10), "ranking", "unknown task"),
    ],
)
def test_prepare_rejects_bad_data(X, y, task, match):
    with pytest.raises(ValueError, match=match):
        training.prepare("bad", X, y, task)


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch, one_torch_thread):
    from egn_fast.cli import tuning

    # the demo tunes first; two points per grid keep the test short
    monkeypatch.setattr(tuning, "TUNING_GRIDS", {"egn": ("damping", (0.1, 1.0)), "adam": ("lr", (1e-3, 1e-2)),
                                                 "sgd": ("lr", (1e-2, 1e-1))})
    assert cli.main(["demo", "--steps", "4", "--batch-size", "16", "--no-progress", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    for name in ("diabetes", "digits", "| egn |", "| adam |", "| sgd |", "steps/s"):
        assert name in table
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert [r["optimizer"] for r in curves["digits"]["runs"]] == ["egn", "adam", "sgd"]
    assert curves["diabetes"]["runs"][0]["steps"][-1] == 4
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| egn |" in capsys.readouterr().out


def test_train_on_a_user_npz(tmp_path):
    X, y = datasets.load_wine(return_X_y=True)
    np.savez(tmp_path / "wine.npz", features=X, label=y)
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "wine.npz"), "--x-key", "features", "--y-key", "label", "--task", "classification",
            "--optimizer", "egn,sgd", "--steps", "30", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    runs = json.loads((out / "curves.json").read_text())["wine"]["runs"]
    assert [r["optimizer"] for r in runs] == ["egn", "sgd"]
    assert runs[0]["train_loss"][-1] < 0.5 * runs[0]["train_loss"][0]


def test_train_reports_bad_input(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((5, 2)))
    with pytest.raises(SystemExit, match="no array"):
        cli.main(["train", "--data", str(tmp_path / "d.npz"), "--task", "regression", "--no-progress", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(tmp_path / "d.npz"), "--task", "regression", "--optimizer", "lbfgs"])
