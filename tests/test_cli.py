"""`egn-fast` refuses bad arguments and bad data in one line (argparse: exit 2; data: a SystemExit
message), before any training, and says what each optimizer runs with."""

import numpy as np
import pytest

from egn_fast import cli


@pytest.fixture
def wine(tmp_path):
    """A small classification .npz (3 classes, integer labels) and its arrays."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), np.repeat([0, 1, 2], 20)
    np.savez(tmp_path / "wine.npz", X=X, y=y)
    return tmp_path / "wine.npz", X, y


def _fails(argv, capsys):
    """(exit code, the message) of a refused command line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    message = capsys.readouterr().err.strip().splitlines()[-1] if code == 2 else str(code)
    return (2 if code == 2 else 1), message


def _train(path, *extra):
    return ["train", "--data", str(path), "--task", "classification", "--steps", "2", "--no-progress", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--damping", "-1"], "argument --damping: expected a finite number ≥ 0, got '-1'"),
        (["--damping", "nan"], "argument --damping: expected a finite number ≥ 0, got 'nan'"),
        (["--egn-lr", "-1"], "argument --egn-lr: expected a finite number > 0, got '-1'"),
        (["--adam-lr", "-1", "--optimizer", "adam"], "argument --adam-lr: expected a finite number > 0, got '-1'"),
        (["--sgd-lr", "inf", "--optimizer", "sgd"], "argument --sgd-lr: expected a finite number > 0, got 'inf'"),
        (["--steps", "0"], "argument --steps: expected an integer ≥ 1, got '0'"),
        (["--batch-size", "x"], "argument --batch-size: expected an integer ≥ 1, got 'x'"),
        (["--damping", "0"], "--damping 0 takes undamped Gauss-Newton steps, which can diverge without a line search; "
                             "use --damping > 0 or add --line-search"),
        (["--optimizer", "adam,sgd", "--line-search"], "--line-search applies to egn only, which --optimizer does not include"),
        (["--optimizer", "sgd", "--damping", "2", "--adaptive-damping"],
         "--damping, --adaptive-damping apply to egn only, which --optimizer does not include"),
        (["--optimizer", "egn", "--adam-lr", "0.1"], "--adam-lr applies to adam only, which --optimizer does not include"),
    ],
)
def test_bad_options_are_argparse_errors(wine, capsys, tmp_path, extra, message):
    code, text = _fails(_train(wine[0], "--out", str(tmp_path / "out"), *extra), capsys)
    assert code == 2 and text.endswith(message), text
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_out_naming_an_existing_file_is_refused(wine, capsys, tmp_path):
    (tmp_path / "taken").write_text("mine")
    code, text = _fails(_train(wine[0], "--out", str(tmp_path / "taken")), capsys)
    assert code == 2 and text.endswith(f"--out {tmp_path / 'taken'} is an existing file; name a directory (created if missing)")
    assert (tmp_path / "taken").read_text() == "mine"


def test_demo_refuses_the_same_options(capsys):
    code, text = _fails(["demo", "--damping", "-1"], capsys)
    assert code == 2 and "argument --damping: expected a finite number ≥ 0" in text


def _data_error(path, capsys, *extra):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_train(path, *extra))
    return str(exit_info.value.code)


def test_a_npy_file_and_a_text_file_named_npz_get_what_they_are(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.ones((4, 2)))
    assert _data_error(tmp_path / "X.npy", capsys) == (
        f"egn-fast train: {tmp_path / 'X.npy'} is a .npy file (one array); save X and y together with "
        "np.savez('data.npz', X=X, y=y)")
    (tmp_path / "t.npz").write_text("1,2,3\n")
    assert _data_error(tmp_path / "t.npz", capsys).startswith(f"egn-fast train: {tmp_path / 't.npz'} is not a .npz archive")
    assert "No such file" in _data_error(tmp_path / "absent.npz", capsys)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.linspace(0, 1, 60), "classification labels must be integers or strings, but y holds non-integer values such as "
                                "0.0169492; for a continuous target use the regression task (--task regression)"),
        (np.where(np.arange(60) % 7 == 0, np.nan, np.arange(60) % 3), "y contains nan/inf; classification needs a class label for every sample"),
    ],
    ids=["float", "nan"],
)
def test_classification_labels_must_be_classes(tmp_path, capsys, labels, message):
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(1).normal(size=(60, 3)), y=labels)
    assert _data_error(tmp_path / "d.npz", capsys) == f"egn-fast train: {message}"


def test_whole_float_labels_and_a_column_regression_target_are_accepted(tmp_path, wine):
    _, X, y = wine
    np.savez(tmp_path / "float_labels.npz", X=X, y=y.astype(np.float64))
    assert cli.main(_train(tmp_path / "float_labels.npz", "--out", str(tmp_path / "a"))) == 0
    np.savez(tmp_path / "column.npz", X=X, y=(X @ np.arange(1.0, 5.0))[:, None])  # y (n, 1)
    argv = ["train", "--data", str(tmp_path / "column.npz"), "--task", "regression", "--steps", "2", "--no-progress",
            "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 0


def test_settings_are_disclosed_with_the_untuned_baselines(wine, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train(wine[0], "--optimizer", "egn,adam,sgd", "--sgd-lr", "0.05", "--out", str(out))) == 0
    line = "Settings: egn lr 1, damping 1; adam lr 0.001; sgd lr 0.05 (adam at torch's default lr, not tuned: set --adam-lr/--sgd-lr)."
    assert line in capsys.readouterr().out
    assert line in (out / "results.md").read_text()
    assert cli.main(_train(wine[0], "--damping", "0", "--line-search", "--out", str(out))) == 0  # λ = 0 with a line search
    assert "Settings: egn lr 1, damping 0, Armijo line search." in capsys.readouterr().out


def test_tune_picks_the_best_grid_point_and_ranks_divergence_last(one_torch_thread):
    from egn_fast.cli import training, tuning

    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    data = training.prepare("linear", X, X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=200), "regression")
    validation = tuning.validation_split(data, 0.25, seed=0)
    assert len(validation.X_train) == 120 and len(validation.X_test) == 40
    assert not (validation.X_test[:, None] == data.X_test[None]).all(-1).any()  # the test rows stay out of tuning
    best, scores = tuning.tune(validation, "sgd", "lr", (1e-6, 0.1, 1e3), steps=40, hidden=(8,))
    assert best == 0.1 and scores[1e3] == float("inf") and scores[0.1] < 0.5 * scores[1e-6], scores


def test_demo_tunes_what_is_not_given_and_says_so(tmp_path, capsys, monkeypatch, one_torch_thread):
    from egn_fast.cli import tuning

    # two points per grid keep the test short; the demo's own grids have six
    monkeypatch.setattr(tuning, "TUNING_GRIDS", {"egn": ("damping", (0.01, 1.0)), "adam": ("lr", (3e-4, 3e-3)),
                                                 "sgd": ("lr", (1e-2, 1e-1))})
    argv = ["demo", "--steps", "3", "--batch-size", "16", "--no-progress", "--sgd-lr", "0.05", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("diabetes", "digits"):
        line = next(l for l in out.splitlines() if l.startswith(f"{name}: Settings:"))
        assert "egn lr 1, damping " in line and " (tuned); adam lr " in line and line.endswith("; sgd lr 0.05.")
        assert line.count("(tuned)") == 2
    assert "| egn damping | 0.01: " in out and "| adam lr | 0.0003: " in out and "| sgd lr |" not in out
    assert "tuned first" in (tmp_path / "results.md").read_text()
