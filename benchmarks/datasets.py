"""Loaders for the benchmark datasets: real data from a data directory, as `egn_fast.cli.training.Dataset`.

Each loader reads one .npz from its `data_dir` argument, else from the directory named by the
environment variable EGN_FAST_DATA (benchmarks/README.md says where each file comes from and what
it holds), and returns a standardized train/test split made by `egn_fast.cli.training.prepare`
(features standardized with the training split's statistics; a regression target standardized
too). California Housing falls back to scikit-learn's `fetch_california_housing` (the same data;
downloads once). A file that is missing, with no fallback that works, raises `DataMissing`: one
line naming the file, its arrays, and how to provide it.

| loader | file | features | target |
|---|---|---|---|
| `california_housing` | california_housing.npz (X, y) | 8 numeric | median house value |
| `diamonds` | diamonds.npz (one array per column) | carat, depth, table, x, y, z + one-hot cut/color/clarity (26) | price |
| `fashion_mnist` | fashion_mnist.npz (X_train, y_train, X_test, y_test) | 784 pixels | 10 classes (the official test split) |
| `womens_reviews` | womens_reviews.npz (text, recommended) | TF-IDF + truncated SVD to 300 dims | recommended (2 classes) |
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from egn_fast.cli.training import Dataset, prepare

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO / ".cache"
DATA_ENV = "EGN_FAST_DATA"


class DataMissing(FileNotFoundError):
    """A dataset file is not there and cannot be fetched; the message says what to provide."""


def resolve_data_dir(data_dir: Path | None) -> Path | None:
    """`data_dir` if given, else $EGN_FAST_DATA if set, else None (no data directory)."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None


def data_file(data_dir: Path | None, name: str) -> Path | None:
    """The path of data file `name` in the resolved data directory, or None when it is not there."""
    directory = resolve_data_dir(data_dir)
    path = None if directory is None else directory / name
    return path if path is not None and path.exists() else None


def missing(data_dir: Path | None, name: str, arrays: tuple[str, ...]) -> str:
    """One line: which file is missing where, what it must hold, how to provide it."""
    directory = resolve_data_dir(data_dir)
    where = f"not found in {directory}" if directory is not None else f"not found (no --data-dir given and {DATA_ENV} is not set)"
    return (f"{name} {where}: put {name} (arrays {', '.join(arrays)}) into a directory and pass --data-dir DIR "
            f"or set {DATA_ENV}=DIR (sources: benchmarks/README.md, 'Data')")


def open_arrays(data_dir: Path | None, name: str, arrays: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of the data file `name` (no pickles), or DataMissing saying what is needed."""
    path = data_file(data_dir, name)
    if path is None:
        raise DataMissing(missing(data_dir, name, arrays))
    with np.load(path, allow_pickle=False) as data:
        absent = [a for a in arrays if a not in data.files]
        if absent:
            raise ValueError(f"{path} lacks arrays {absent}; it holds {data.files}")
        return {a: data[a] for a in arrays}


def california_housing(data_dir: Path | None = None, test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """California Housing (20640 × 8), target median house value; X (n, 8), y (n, 1) standardized."""
    try:
        arrays = open_arrays(data_dir, "california_housing.npz", ("X", "y"))
        X, y = arrays["X"], arrays["y"]
    except DataMissing as absent:
        from sklearn.datasets import fetch_california_housing

        print(f"{absent}\nfalling back to scikit-learn's fetch_california_housing (the same data)")
        try:
            X, y = fetch_california_housing(return_X_y=True)
        except OSError as err:  # no network (URLError is an OSError) or no writable data home
            raise DataMissing(f"{absent}; scikit-learn's fetch_california_housing failed too ({err})") from None
    return prepare("california_housing", X, y, "regression", test_fraction, seed)


def diamonds(data_dir: Path | None = None, test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """ggplot2's diamonds (53940 rows): 6 numeric columns + one-hot cut, color, clarity → X (n, 26);
    target price, y (n, 1) standardized."""
    numeric = ("carat", "depth", "table", "x", "y", "z")
    categorical = ("cut", "color", "clarity")
    cols = open_arrays(data_dir, "diamonds.npz", numeric + categorical + ("price",))
    one_hot = [(cols[c][:, None] == np.unique(cols[c])[None, :]).astype(np.float64) for c in categorical]
    X = np.concatenate([np.stack([cols[c] for c in numeric], 1)] + one_hot, 1)
    return prepare("diamonds", X, cols["price"], "regression", test_fraction, seed)


def fashion_mnist(data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST with its official split: X (n, 784) pixels standardized per pixel with the
    training split's statistics (reshape to (n, 1, 28, 28) for a CNN), y (n,) class in 0..9."""
    arrays = open_arrays(data_dir, "fashion_mnist.npz", ("X_train", "y_train", "X_test", "y_test"))
    X_train = arrays["X_train"].reshape(len(arrays["X_train"]), -1).astype(np.float32) / 255
    X_test = arrays["X_test"].reshape(len(arrays["X_test"]), -1).astype(np.float32) / 255
    mean, std = X_train.mean(0), X_train.std(0)
    std = np.where(std > 0, std, 1.0)

    def tensor(X: np.ndarray) -> torch.Tensor:
        return torch.tensor((X - mean) / std, dtype=torch.float32)

    y_train = torch.tensor(arrays["y_train"], dtype=torch.int64)
    y_test = torch.tensor(arrays["y_test"], dtype=torch.int64)
    return Dataset("fashion_mnist", "classification", tensor(X_train), y_train, tensor(X_test), y_test, 10)


def review_features(texts: np.ndarray, train_rows: np.ndarray, dims: int = 300, seed: int = 0) -> np.ndarray:
    """TF-IDF (words, sublinear tf, terms in ≥ 3 training reviews) + truncated SVD to `dims`
    dimensions, both fitted on the training rows only (no test leakage): (n, dims) float64."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=3, stop_words="english")
    train_matrix = tfidf.fit_transform(texts[train_rows])
    svd = TruncatedSVD(dims, random_state=seed).fit(train_matrix)
    return svd.transform(tfidf.transform(texts))


def womens_reviews(
    data_dir: Path | None = None, test_fraction: float = 0.1, seed: int = 0, cache_dir: Path | None = DEFAULT_CACHE_DIR
) -> Dataset:
    """Women's clothing reviews → 300-d TF-IDF + SVD features (as the EGN paper used 300-d sentence
    vectors for IMDB), binary target "recommended"; X (n, 300), y (n,) in {0, 1}.

    The features take ~30 s on 2 cores; they are cached in `cache_dir` (None: no cache), keyed by
    a hash of the texts, the split and the seed."""
    arrays = open_arrays(data_dir, "womens_reviews.npz", ("text", "recommended"))
    texts, labels = arrays["text"], arrays["recommended"]
    # The same shuffle and split as `prepare` below, so the SVD is fitted on training rows only.
    n_test = int(round(len(texts) * test_fraction))
    train_rows = np.random.default_rng(seed).permutation(len(texts))[n_test:]
    key = hashlib.sha256(texts.tobytes() + f"{test_fraction},{seed}".encode()).hexdigest()[:16]
    cached = None if cache_dir is None else Path(cache_dir) / f"womens_reviews_{key}.npy"
    if cached is not None and cached.exists():
        X = np.load(cached)
    else:
        X = review_features(texts, train_rows, seed=seed)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, X)
    return prepare("womens_reviews", X, labels, "classification", test_fraction, seed)
