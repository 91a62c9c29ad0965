"""benchmarks/text_data.py, char_gpt.py, text_bench.py, char_lm.py and review_classifier.py on a
small generated womens_reviews.npz (the real file is never needed): vocabulary and splits,
shifted LM windows, padding, the models' causality and padding invariance, grid widening, and
the --quick runs' JSON."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark

ALPHABET = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-()") + ["é", "ü", "☺", "ß"]


def write_reviews(path, n: int = 120, seed: int = 0) -> None:
    """n synthetic reviews over ~75 characters (more than 63, so some map to UNK)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(ALPHABET) + 1)  # Zipf-like: a clear frequency order
    texts = ["".join(rng.choice(ALPHABET, size=rng.integers(20, 140), p=weights / weights.sum())) for _ in range(n)]
    rating = rng.integers(1, 6, n)
    np.savez(path, text=np.array(texts), recommended=(rating >= 4).astype(np.int64), rating=rating)


@pytest.fixture
def mods(monkeypatch):
    names = ["text_data", "char_gpt", "text_bench", "char_lm", "review_classifier"]
    return {n: load_benchmark(n, monkeypatch) for n in names}


@pytest.fixture
def corpus(tmp_path, mods):
    write_reviews(tmp_path / "womens_reviews.npz")
    return mods["text_data"].load_corpus(tmp_path)


def test_vocabulary_and_splits(corpus, mods):
    td = mods["text_data"]
    rows = corpus.rows
    allrows = np.concatenate([rows["train"], rows["val"], rows["test"]])
    assert sorted(allrows.tolist()) == list(range(120))  # disjoint and complete
    assert (len(rows["train"]), len(rows["val"]), len(rows["test"])) == (96, 12, 12)
    assert corpus.vocab.size == td.VOCAB_SIZE == 64 and len(set(corpus.vocab.chars)) == 63
    counts = Counter("\n".join(corpus.texts[rows["train"]].tolist()))  # training texts only
    ranked = sorted(counts, key=lambda c: (-counts[c], ord(c)))
    assert corpus.vocab.chars == "".join(ranked[:63])
    stream = corpus.streams["train"]
    assert stream.dtype == torch.int64 and int(stream.max()) <= td.UNK_ID and (stream == td.UNK_ID).any()
    assert corpus.vocab.decode(stream[:200]) == "".join(c if c in corpus.vocab.chars else "\ufffd"
                                                        for c in "\n".join(corpus.texts[rows["train"]].tolist())[:200])


def test_missing_file_is_one_line(tmp_path, mods):
    with pytest.raises(mods["text_data"].DataMissing) as err:
        mods["text_data"].load_corpus(tmp_path)
    assert "womens_reviews.npz" in str(err.value) and "\n" not in str(err.value)


def test_windows_are_shifted_by_one(corpus, mods):
    td = mods["text_data"]
    stream = corpus.streams["train"]
    batches = list(td.char_batches(stream, 8, 16, 3, torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and all(b.shape == (8, 17) for b in batches)
    x, y = td.split_window(batches[0])
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    text = stream.tolist()
    for w in batches[0].tolist():  # every window is a contiguous piece of the stream
        assert any(text[s:s + 17] == w for s in range(len(text) - 16))
    again = next(td.char_batches(stream, 8, 16, 1, torch.Generator().manual_seed(0)))
    assert torch.equal(again, batches[0])


def test_review_tensors_pad_and_label(corpus, mods):
    td = mods["text_data"]
    ids, mask, y = td.review_tensors(corpus, "test", 32)
    rows = corpus.rows["test"]
    lengths = torch.tensor([min(len(corpus.texts[r]), 32) for r in rows])
    assert torch.equal(mask.sum(1), lengths) and torch.equal(ids == td.PAD_ID, ~mask)
    assert torch.equal(ids[0, : lengths[0]], corpus.vocab.encode(str(corpus.texts[rows[0]])[:32]))
    assert torch.equal(y, torch.as_tensor(corpus.labels["rating"][rows]) - 1) and int(y.max()) <= 4


def test_classifier_ignores_padding(mods):
    cg, td = mods["char_gpt"], mods["text_data"]
    torch.manual_seed(0)
    model = cg.ReviewClassifier(64, 5, td.PAD_ID, d=32, layers=2, heads=4, T=24).eval()
    seq = torch.randint(0, 64, (1, 10))
    padded = torch.cat([seq, torch.full((1, 14), td.PAD_ID)], 1)
    assert torch.allclose(model(padded), model(seq), atol=1e-5)
    other = torch.randint(0, 64, (1, 24))
    both = model(torch.cat([padded, other]))  # a padded and a full row in one batch
    assert torch.allclose(both[0], model(seq)[0], atol=1e-5) and torch.allclose(both[1], model(other)[0], atol=1e-5)
    assert not torch.allclose(model(other[:, :10]), model(other), atol=1e-4)  # the mask does matter


def test_char_gpt_is_causal_and_tied(mods):
    torch.manual_seed(0)
    model = mods["char_gpt"].CharGPT(64, d=32, layers=2, heads=4, T=16)
    ids = torch.randint(0, 64, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    a, b = model(ids), model(changed)
    assert a.shape == (2, 16, 64)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6) and not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)
    assert model.head.weight is model.wte.weight and not any(n.startswith("head") for n, _ in model.named_parameters())
    assert torch.allclose(a, model.features(ids) @ model.wte.weight.T, atol=1e-5)


def test_tune_widens_an_edge_choice(mods):
    tb = mods["text_bench"]
    spec = tb.OptSpec("x", "x", None, tb.points(lr=[1e-3, 1e-2]), {"lr": 1e-3}, widen="lr")

    def run_point(point):  # loss minimal at lr = 0.1: the grid must grow upwards past 1e-2
        run = tb.Run("x", point, 0, "tune", curve={"loss": [abs(math.log10(point["lr"]) + 1)]})
        return run

    chosen, runs, edge = tb.tune(spec, run_point, "loss")
    assert math.isclose(chosen["lr"], 0.1) and not edge
    assert sorted(round(math.log10(r.point["lr"])) for r in runs) == [-3, -2, -1, 0]


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_char_lm_quick_run(tmp_path, mods):
    write_reviews(tmp_path / "womens_reviews.npz", n=200)
    names = "adamw,sgd" + (",egn_mc1" if mods["text_bench"].EGN_HAS_CURVATURE else "")
    mods["char_lm"].main(["--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path), "--optimizers", names,
                          "--d", "32", "--layers", "1", "--steps", "12", "--batch-size", "8"])
    report = json.loads((tmp_path / "char_lm_cpu_quick.json").read_text())
    assert (tmp_path / "char_lm_cpu_quick.png").exists() and (tmp_path / "char_lm_cpu_quick.md").exists()
    assert _finite({k: v for k, v in report.items() if k != "optimizers"})
    adamw = report["optimizers"]["adamw"]
    run = adamw["seed_runs"][0]
    assert run["stopped"] is None and run["curve"]["step"][-1] == 12 and _finite(run["final"])
    assert run["curve"]["val_loss"][-1] < run["curve"]["val_loss"][0]  # AdamW learned something
    times = report["step_time"]["methods"]
    assert times["adamw"]["ratio_to_adamw"] == 1.0 and times["sgd"]["median_ms"] > 0


def test_review_classifier_quick_run(tmp_path, mods):
    write_reviews(tmp_path / "womens_reviews.npz", n=200)
    mods["review_classifier"].main(["--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path), "--steps", "6",
                                    "--batch-size", "8"])
    report = json.loads((tmp_path / "review_classifier_cpu_quick.json").read_text())
    for name in ("egn", "adamw", "sgd"):
        summary = report["optimizers"][name]["summary"]
        assert not summary["stopped"], (name, summary["stopped"])
        assert _finite(summary) and 0 <= summary["accuracy"][0] <= 1
    egn = report["step_time"]["methods"]["egn"]
    assert egn["ratio_to_adamw"] > 1 and {"forward", "gram", "solve", "backproject"} <= set(egn["stages_s"])


def test_make_egn_passes_the_curvature_contract(mods, monkeypatch):
    tb = mods["text_bench"]
    seen = []
    monkeypatch.setattr(tb, "EGN", lambda model, **kw: seen.append(kw) or kw)
    tb.make_egn(None, 3, curvature="mc", mc_samples=4, lr=0.5, damping=10.0, momentum=0.9)
    tb.make_egn(None, 3, curvature="empirical", lr=1.0, damping=1.0, adaptive=True)
    tb.make_egn(None, 3, curvature="exact", lr=1.0, damping=1.0)
    mc, emp, exact = seen
    assert mc["curvature"] == "mc" and mc["mc_samples"] == 4 and mc["momentum"] == 0.9 and mc["timings"]
    assert mc["generator"].initial_seed() == 10_003 and mc["loss"] == "cross_entropy"
    assert emp["curvature"] == "empirical" and "mc_samples" not in emp and emp["adaptive_damping"] is True
    assert not {"curvature", "mc_samples", "generator"} & set(exact)
