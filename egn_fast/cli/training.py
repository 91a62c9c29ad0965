"""Small training runs for the CLI: real tabular data, an MLP, EGN vs Adam vs SGD on one budget.

Data flows one way: arrays (X, y) → `prepare` (split, standardize) → `fit` a model with one
optimizer (`train`: a fresh MLP and a named optimizer; history of train loss / test metric vs
step and wall time) → `compare` several → `summary_table` and `plot_curves`. The benchmarks
(benchmarks/convergence.py) reuse `prepare` and `fit`. Losses follow egn_fast's conventions: "mse" is the batch mean of ½‖f − y‖²
(so the train loss is half the usual MSE), "cross_entropy" the batch-mean negative log-likelihood.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..losses import Loss, resolve_loss
from ..optim import EGN, SGN

__all__ = [
    "Dataset",
    "History",
    "prepare",
    "load_npz",
    "check_labels",
    "sklearn_dataset",
    "make_mlp",
    "make_optimizer",
    "evaluate",
    "optimizer_step",
    "fit",
    "train",
    "compare",
    "summary_table",
    "plot_curves",
    "OPTIMIZERS",
]

TASKS = ("regression", "classification")
OPTIMIZERS = ("egn", "adam", "sgd")


@dataclass
class Dataset:
    """A standardized train/test split. X: (n, features) float32; y: (n, 1) float32 for
    regression (standardized), (n,) int64 class indices for classification."""

    name: str
    task: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    num_outputs: int

    @property
    def loss(self) -> str:
        return "mse" if self.task == "regression" else "cross_entropy"

    @property
    def metric(self) -> str:
        return "test MSE" if self.task == "regression" else "test accuracy"


@dataclass
class History:
    """One optimizer's run: evaluations every `eval_every` steps (step 0 included)."""

    optimizer: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training wall time at each evaluation
    train_loss: list[float] = field(default_factory=list)  # on the whole training set
    test_metric: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # optimizer steps only (evaluations excluded)


def prepare(name: str, X: np.ndarray, y: np.ndarray, task: str, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Shuffle, split off `test_fraction` for testing, standardize features (and the regression
    target) with the training split's mean and std."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2:
        X = X.reshape(len(X), -1)
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector is one target per sample too
        y = y[:, 0]
    if len(X) != len(y) or y.ndim != 1:
        raise ValueError(f"need X (n, features) and y (n,) or (n, 1); got X {X.shape} and y {y.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains nan/inf")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(len(X) * test_fraction))
    if n_test < 1 or len(X) - n_test < 2:
        raise ValueError(f"{len(X)} samples are too few for a train/test split")
    order = np.random.default_rng(seed).permutation(len(X))
    test, tr = order[:n_test], order[n_test:]
    mean, std = X[tr].mean(0), X[tr].std(0)
    X = (X - mean) / np.where(std > 0, std, 1.0)
    if task == "regression":
        y = y.astype(np.float64)
        if not np.isfinite(y).all():
            raise ValueError("y contains nan/inf")
        y = ((y - y[tr].mean()) / (y[tr].std() or 1.0))[:, None]
        y_t, num_outputs = torch.tensor(y, dtype=torch.float32), 1
    else:
        check_labels(y)
        classes, labels = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("classification needs at least 2 classes in y")
        y_t, num_outputs = torch.tensor(labels, dtype=torch.int64), len(classes)
    X_t = torch.tensor(X, dtype=torch.float32)
    return Dataset(name, task, X_t[tr], y_t[tr], X_t[test], y_t[test], num_outputs)


def check_labels(y: np.ndarray) -> None:
    """Class labels must be integers, booleans or strings (floats only when whole numbers), never nan."""
    if y.dtype.kind not in "biufUS":
        raise ValueError(f"classification labels must be integers or strings, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise ValueError("y contains nan/inf; classification needs a class label for every sample")
        fractional = y[y != np.round(y)]
        if len(fractional):
            raise ValueError(
                f"classification labels must be integers or strings, but y holds non-integer values such as "
                f"{fractional[0]:g}; for a continuous target use the regression task (--task regression)"
            )


def load_npz(path: str | Path, x_key: str = "X", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) from a .npz file holding arrays `x_key` and `y_key` (no pickles)."""
    with open(path, "rb") as file:
        magic = file.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"{path} is a .npy file (one array); save X and y together with np.savez('data.npz', X=X, y=y)")
    if magic[:2] != b"PK":  # a .npz is a zip archive of .npy files
        raise ValueError(f"{path} is not a .npz archive (a zip of arrays, as np.savez writes); save X and y with np.savez('data.npz', X=X, y=y)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in (x_key, y_key) if k not in data.files]
        if missing:
            raise ValueError(f"{path} has no array(s) {missing}; it holds {data.files}")
        return data[x_key], data[y_key]


def sklearn_dataset(name: str, seed: int = 0) -> Dataset:
    """scikit-learn's bundled (no download) "diabetes" regression or "digits" classification."""
    from sklearn import datasets

    if name == "diabetes":
        X, y = datasets.load_diabetes(return_X_y=True)
        return prepare(name, X, y, "regression", seed=seed)
    if name == "digits":
        X, y = datasets.load_digits(return_X_y=True)
        return prepare(name, X, y, "classification", seed=seed)
    raise ValueError(f"unknown bundled dataset {name!r}; expected 'diabetes' or 'digits'")


def make_mlp(
    num_inputs: int, hidden: tuple[int, ...], num_outputs: int, seed: int = 0, activation: type[nn.Module] = nn.Tanh
) -> nn.Sequential:
    """Linear-activation-…-Linear (tanh by default), initialized from `seed` (the same network for
    every optimizer)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(num_inputs, width), activation()]
        num_inputs = width
    layers.append(nn.Linear(num_inputs, num_outputs))
    return nn.Sequential(*layers)


def make_optimizer(name: str, model: nn.Module, loss: str, lr: float | None = None, **egn_options: Any) -> torch.optim.Optimizer:
    """"egn" (EGN, lr 1.0 unless given; `egn_options` go to EGN) | "adam" | "sgd" (torch's
    defaults: lr 1e-3) ."""
    if name == "egn":
        return EGN(model, loss=loss, lr=1.0 if lr is None else lr, **egn_options)
    if egn_options:
        raise ValueError(f"options {sorted(egn_options)} apply to egn only")
    if name == "adam":
        return torch.optim.Adam(model.parameters()) if lr is None else torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters()) if lr is None else torch.optim.SGD(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


Evaluate = Callable[[nn.Module], tuple[float, float]]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(loss on the whole training set, test metric: MSE for regression, accuracy for classification)."""
    train_loss = float(resolve_loss(data.loss).batch_mean(model(data.X_train), data.y_train))
    f = model(data.X_test)
    if data.task == "regression":
        return train_loss, float((f - data.y_test).pow(2).mean())
    return train_loss, float((f.argmax(1) == data.y_test).double().mean())


def optimizer_step(opt: torch.optim.Optimizer, model: nn.Module, loss: Loss, x: Tensor, y: Tensor) -> None:
    """One step on the mini-batch (x, y): optimizers with `step(inputs, targets)` (EGN, SGN) take
    the batch themselves; first-order ones get zero_grad + forward + loss + backward + step."""
    if isinstance(opt, (EGN, SGN)):
        opt.step(x, y)
        return
    opt.zero_grad()
    loss.batch_mean(model(x), y).backward()
    opt.step()


def fit(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Dataset,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    eval_every: int = 10,
    progress: Callable[[int], None] | None = None,
    evaluate_fn: Evaluate | None = None,
    name: str = "",
) -> History:
    """Train `model` with `opt` for `steps` mini-batch steps on data.X_train (batches from
    replacement-free epochs shuffled by `seed`), evaluating every `eval_every` steps (and at step
    0 and the last step) with `evaluate_fn(model) -> (train loss, test metric)` (default
    `evaluate(model, data)`); `progress(k)` after k steps. Only the steps count as training time."""
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError("steps, batch_size and eval_every must be ≥ 1")
    evaluate_fn = evaluate_fn or (lambda m: evaluate(m, data))
    loss = resolve_loss(data.loss)  # once, not inside the timed steps
    gen = torch.Generator().manual_seed(seed)
    n = len(data.X_train)
    batch_size = min(batch_size, n)
    hist = History(name)

    def record(step: int) -> None:
        train_loss, metric = evaluate_fn(model)
        hist.steps.append(step)
        hist.seconds.append(hist.train_seconds)
        hist.train_loss.append(train_loss)
        hist.test_metric.append(metric)

    record(0)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        t0 = time.perf_counter()
        optimizer_step(opt, model, loss, data.X_train[idx], data.y_train[idx])
        if data.X_train.is_cuda:  # count the step's GPU work, not just its launch
            torch.cuda.synchronize(data.X_train.device)
        hist.train_seconds += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            record(step)
        if progress is not None:
            progress(1)
    return hist


def train(
    data: Dataset,
    optimizer: str,
    steps: int,
    batch_size: int = 64,
    hidden: tuple[int, ...] = (32,),
    lr: float | None = None,
    seed: int = 0,
    eval_every: int = 10,
    progress: Callable[[int], None] | None = None,
    **egn_options: Any,
) -> History:
    """`fit` a fresh tanh MLP (same init for every optimizer given the seed) with the named
    optimizer ("egn" | "adam" | "sgd")."""
    model = make_mlp(data.X_train.shape[1], hidden, data.num_outputs, seed)
    opt = make_optimizer(optimizer, model, data.loss, lr, **egn_options)
    return fit(model, opt, data, steps, batch_size, seed, eval_every, progress, name=optimizer)


def compare(
    data: Dataset, optimizers: list[str], steps: int, show_progress: bool = True, options: dict[str, dict[str, Any]] | None = None, **kwargs: Any
) -> list[History]:
    """`train` each optimizer on the same data, network init and batches; one progress bar.

    options: per-optimizer keyword arguments for `train` (e.g. {"sgd": {"lr": 0.1}})."""
    from tqdm.auto import tqdm

    options = options or {}
    histories = []
    with tqdm(total=steps * len(optimizers), desc=data.name, unit="step", disable=not show_progress) as bar:
        for name in optimizers:
            bar.set_postfix_str(name)
            histories.append(train(data, name, steps, progress=bar.update, **{**kwargs, **options.get(name, {})}))
    return histories


def summary_table(data: Dataset, histories: list[History]) -> str:
    """Markdown table: final train loss, final test metric, training wall time, steps/s."""
    lines = [
        f"| {data.name} ({data.task}) | train loss | {data.metric} | wall time (s) | steps/s |",
        "|---|---|---|---|---|",
    ]
    for h in histories:
        rate = h.steps[-1] / h.train_seconds if h.train_seconds > 0 else float("inf")
        lines.append(f"| {h.optimizer} | {h.train_loss[-1]:.4g} | {h.test_metric[-1]:.4g} | {h.train_seconds:.2f} | {rate:.0f} |")
    return "\n".join(lines)


def plot_curves(results: list[tuple[Dataset, list[History]]], path: str | Path) -> Path:
    """One row per dataset: train loss vs step, train loss vs wall time, test metric vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(14, 3.8 * len(results)), squeeze=False)
    for row, (data, histories) in zip(axes, results):
        for h in histories:
            row[0].plot(h.steps, h.train_loss, label=h.optimizer)
            row[1].plot(h.seconds, h.train_loss, label=h.optimizer)
            row[2].plot(h.steps, h.test_metric, label=h.optimizer)
        for ax, xlabel, ylabel in zip(row, ["step", "training time (s)", "step"], ["train loss", "train loss", data.metric]):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{data.name}: {ylabel}")
            ax.grid(alpha=0.3)
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
