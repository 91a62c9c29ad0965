"""`Factors.backproject_rows` (the rows of J̃ᵀu a rank keeps of a sharded parameter) equals the
whole back-projection cut to those rows, and `Factors.project_rows` over a partition of the rows
sums to the whole J̃v, for every built-in factor type and its variants (dense, ghost and kept
per-sample rows, a transposed weight, embeddings by ghost and by rows, merged rows)."""

import pytest
import torch

import egn_fast
from hf_tiny import gpt2
from models import make, targets
from token_models import TinyGPT, randomize


def _systems():
    for kind in ("mlp", "seq_linear", "embedding", "norms", "conv1d", "multihead_attention", "shared_across_modules"):
        for seq_method in ("ghost", "per_sample"):
            model, x = make(kind, True, 3)
            yield f"{kind}-{seq_method}", egn_fast.build_system(model, x, targets("mse", b=x.shape[0], seed=3), seq_method=seq_method)
    table = torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()  # 50 ≥ T²: ghost
    ids = torch.randint(50, (3, 5), generator=torch.Generator().manual_seed(4))
    yield "embedding_ghost", egn_fast.build_system(table, ids, torch.randn(3, 5, 3, dtype=torch.float64))
    lm = randomize(TinyGPT(vocab=40, T=6), 2).double()
    ids = torch.randint(40, (3, 6), generator=torch.Generator().manual_seed(0))
    yield "tiny_gpt", egn_fast.build_system(lm, ids, torch.randn(3, 6, 40, dtype=torch.float64))
    hf = gpt2(1)  # transformers' Conv1D: a transposed (in, out) weight
    ids = torch.randint(5, (3, 4), generator=torch.Generator().manual_seed(1))
    yield "gpt2", egn_fast.build_system(hf, closure=lambda: (hf(ids).logits, torch.randn(3, 4, hf.config.vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))))


@pytest.mark.parametrize("name,system", list(_systems()), ids=lambda v: v if isinstance(v, str) else "")
def test_backproject_rows_is_the_cut_whole_back_projection(name, system):
    u = torch.randn(system.b, system.s, dtype=system.w.dtype, generator=torch.Generator().manual_seed(5))
    types = set()
    for f in system.factors:
        whole = f.backproject(u, system.backend)
        v = [torch.randn(p.shape, dtype=system.w.dtype, generator=torch.Generator().manual_seed(6)) for p in f.params]
        for pieces in (2, 3, 5):  # torch.chunk-like splits, the last ranks with few or no rows
            for q in range(pieces):
                rows = []
                for p in f.params:
                    n = p.shape[0]
                    chunk = -(-n // pieces)
                    rows.append(slice(min(q * chunk, n), min((q + 1) * chunk, n)))
                got = f.backproject_rows(u, system.backend, rows)
                for d, g, r in zip(whole, got, rows):
                    assert g.shape == d[r].shape
                    torch.testing.assert_close(g, d[r], rtol=1e-12, atol=1e-12 * float(d.abs().max()))
            if len(getattr(f, "groups", [None])) > 1:  # a grouped layer's rows span groups: J̃v takes v whole
                continue
            parts = []
            for q in range(pieces):
                rows = [slice(min(q * -(-p.shape[0] // pieces), p.shape[0]), min((q + 1) * -(-p.shape[0] // pieces), p.shape[0])) for p in f.params]
                parts.append(f.project_rows([x[r] for x, r in zip(v, rows)], system.backend, system.w.dtype, rows))
            want = f.project(v, system.backend, system.w.dtype)
            torch.testing.assert_close(sum(parts), want, rtol=1e-11, atol=1e-11 * float(want.abs().max()))
            types.add(type(f).__name__ + "/project_rows")
        types.add(type(f).__name__)
    assert types  # the system has factors to check
