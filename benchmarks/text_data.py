"""Character-level data from the women's clothing reviews, for the text benchmarks (char_lm.py,
review_classifier.py).

The file is womens_reviews.npz (arrays text: title + body per review, recommended: 0/1, rating:
1–5; benchmarks/README.md, 'Data'), read from `--data-dir` or $EGN_FAST_DATA like every benchmark
file (benchmarks/datasets.py); without it `load_corpus` raises `datasets.DataMissing`, one line.

* Split: the reviews (not characters) are split train / val / test by a seeded permutation
  (default 80 / 10 / 10 %), so no review is in two splits.
* Vocabulary: the 63 most frequent characters of the training split's stream (reviews joined by a
  newline) in order of frequency (ties by code point), ids 0–62, plus one UNK id 63 for every
  other character: V = 64. The classifier's padding id is V (64), outside the vocabulary.
* Language modelling: `char_batches` samples (b, T + 1) windows from the concatenated training
  stream (uniform start offsets from a torch.Generator); `split_window` makes inputs w[:, :-1] and
  next-character targets w[:, 1:], both (b, T). `fixed_windows` draws a fixed validation set.
* Classification: `review_tensors` gives ids (n, T) long, each review's first T characters padded
  with PAD_ID at the end, the padding mask (n, T) bool (True = a real character) and labels
  (n,) long: rating − 1 (5 classes) or recommended (2 classes).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import DataMissing, open_arrays  # noqa: E402, F401 (DataMissing: what load_corpus raises)

FILE = "womens_reviews.npz"
ARRAYS = ("text", "recommended", "rating")
SEPARATOR = "\n"
KNOWN_CHARS = 63  # the most frequent characters get their own id; the rest share UNK
VOCAB_SIZE = KNOWN_CHARS + 1
UNK_ID = KNOWN_CHARS
PAD_ID = VOCAB_SIZE  # classification padding, outside the vocabulary
LABELS = {"rating": 5, "recommended": 2}

__all__ = ["DataMissing", "Vocabulary", "Corpus", "load_corpus", "corpus_from_arrays", "char_batches",
           "split_window", "fixed_windows", "review_tensors"]


@dataclass(frozen=True)
class Vocabulary:
    """`chars[i]` has id i (i < len(chars)); any other character is `unk` = len(chars)."""

    chars: str

    @property
    def unk(self) -> int:
        return len(self.chars)

    @property
    def size(self) -> int:
        """Number of ids: the known characters plus UNK."""
        return len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str, known: int = KNOWN_CHARS) -> "Vocabulary":
        """The `known` most frequent characters of `text`, by frequency, ties by code point."""
        counts = Counter(text)
        ranked = sorted(counts, key=lambda c: (-counts[c], ord(c)))
        return cls("".join(ranked[:known]))

    def encode(self, text: str) -> Tensor:
        """(len(text),) int64 ids."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if len(codes) == 0:
            return torch.zeros(0, dtype=torch.int64)
        top = max(int(codes.max()), max(map(ord, self.chars), default=0)) + 1
        table = np.full(top, self.unk, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return torch.from_numpy(table[codes])

    def decode(self, ids: Tensor) -> str:
        """ids (n,) → text; UNK (and the padding id) as '\\ufffd'."""
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids.tolist())


@dataclass
class Corpus:
    """The reviews, their split and the vocabulary; `streams[split]` is the split's reviews
    joined by SEPARATOR, encoded: (n_chars,) int64."""

    texts: np.ndarray  # (n,) str
    labels: dict[str, np.ndarray]  # "rating" (n,) in 1..5, "recommended" (n,) in {0, 1}
    rows: dict[str, np.ndarray]  # "train" / "val" / "test": review indices into texts
    vocab: Vocabulary
    streams: dict[str, Tensor]


def _split_rows(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Review indices of train / val / test from a seeded permutation (val, test: rounded shares)."""
    if not (len(fractions) == 3 and min(fractions) >= 0 and abs(sum(fractions) - 1) < 1e-9):
        raise ValueError(f"fractions must be three shares summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * fractions[1])), int(round(n * fractions[2]))
    return {"train": order[n_val + n_test:], "val": order[:n_val], "test": order[n_val:n_val + n_test]}


def corpus_from_arrays(texts: np.ndarray, labels: dict[str, np.ndarray],
                       fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> Corpus:
    """Split, vocabulary (from the training stream only) and encoded streams of in-memory arrays."""
    texts = np.asarray(texts).astype(str)
    rows = _split_rows(len(texts), fractions, seed)
    joined = {k: SEPARATOR.join(texts[r].tolist()) for k, r in rows.items()}
    vocab = Vocabulary.from_text(joined["train"])
    return Corpus(texts, labels, rows, vocab, {k: vocab.encode(s) for k, s in joined.items()})


def corpus_or_exit(data_dir: Path | None, script: str) -> "Corpus":
    """`load_corpus`, or SystemExit with DataMissing's one line prefixed by the script's name."""
    try:
        return load_corpus(data_dir)
    except DataMissing as err:
        raise SystemExit(f"{script}: {err}") from None


def load_corpus(data_dir: Path | None = None, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> Corpus:
    """womens_reviews.npz from `data_dir` or $EGN_FAST_DATA as a `Corpus`; DataMissing if absent."""
    data = open_arrays(data_dir, FILE, ARRAYS)
    return corpus_from_arrays(data["text"], {"rating": data["rating"], "recommended": data["recommended"]}, fractions, seed)


# --------------------------------------------------------------------------- language modelling


def _windows(stream: Tensor, starts: Tensor, T: int) -> Tensor:
    """(len(starts), T + 1) windows stream[s : s + T + 1]."""
    return stream[starts[:, None] + torch.arange(T + 1)]


def char_batches(stream: Tensor, batch_size: int, T: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`steps` batches of (batch_size, T + 1) windows of `stream` at uniform random offsets."""
    if len(stream) < T + 1:
        raise ValueError(f"a stream of {len(stream)} characters has no window of T + 1 = {T + 1}")
    for _ in range(steps):
        yield _windows(stream, torch.randint(0, len(stream) - T, (batch_size,), generator=generator), T)


def split_window(windows: Tensor) -> tuple[Tensor, Tensor]:
    """(b, T + 1) windows → inputs (b, T) and next-character targets (b, T)."""
    return windows[:, :-1], windows[:, 1:]


def fixed_windows(stream: Tensor, n: int, T: int, seed: int = 1234) -> Tensor:
    """A fixed evaluation set: (n, T + 1) windows at offsets drawn once from `seed`."""
    return next(char_batches(stream, n, T, 1, torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------- classification


def review_tensors(corpus: Corpus, split: str, T: int, label: str = "rating") -> tuple[Tensor, Tensor, Tensor]:
    """The split's reviews as ids (n, T) (first T characters, PAD_ID after the end), padding
    mask (n, T) bool (True = a character) and labels (n,): rating − 1 or recommended."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
    rows = corpus.rows[split]
    heads = [str(corpus.texts[r])[:T] for r in rows]
    lengths = torch.tensor([len(h) for h in heads], dtype=torch.int64)
    mask = torch.arange(T) < lengths[:, None]
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.int64)
    ids[mask] = corpus.vocab.encode("".join(heads))  # row-major order = the reviews one after another
    y = torch.as_tensor(corpus.labels[label][rows], dtype=torch.int64)
    return ids, mask, y - 1 if label == "rating" else y
