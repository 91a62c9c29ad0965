"""Language-model rows in exact data-parallel EGN (docs/design.md §6) on real gloo process groups
(tests/distributed_harness.py): per-token cross-entropy over the global token count, Monte-Carlo
and empirical rows with draws that do not depend on the number of ranks or the split, the Adam
metric from the global gradient — each against one process on the concatenated batch — and the
errors raised on one rank before the mid-build sync."""

import functools

import pytest
import torch

import distributed_lm_cases as cases
import egn_fast
from distributed_harness import run_ranks
from egn_fast.losses import BatchShare
from oracle import rel_err
from token_models import mc_token_oracle

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


@functools.cache
def reference() -> dict:
    """One process on the whole batch: every case's (direction, samples, loss)."""
    out = {}
    for name in cases.CASES:
        info = cases.direction_of(name, 0, cases.B)
        out[name] = (cases.flat(info.direction), info.samples, info.loss)
    return out


@functools.cache
def reference_steps(state: bytes) -> tuple[list[tuple], torch.Tensor]:
    """The optimizer's steps in one process, its generator started in the ranks' state."""
    model = cases.lm_problem()[0]
    opt = cases.lm_optimizer(model, None)
    opt.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return cases.run_steps(opt, cases.step_batches(), 0, cases.B), cases.flat(list(model.parameters()))


def same_draws(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got, want, rtol=1e-12, atol=0) if got.is_floating_point() else torch.equal(got, want)


def check_ranks(results: list[dict], world: int) -> None:
    ref = reference()
    for split in cases.splits(world):
        for name, (d, samples, loss) in ref.items():
            for r, res in enumerate(results):
                got_d, got_samples, got_loss = res[(tuple(split), name)]
                assert rel_err([got_d], [d]) < 1e-10, (split, name, r, rel_err([got_d], [d]))
                assert abs(got_loss - loss) < 1e-12 * abs(loss), (split, name, got_loss, loss)
                # the same global draws whatever the number of ranks and the split (mse's ŷ = f + ε: f's
                # last bits depend on the shard's size)
                assert (samples is None and got_samples is None) or same_draws(got_samples, samples), (split, name)
                assert torch.equal(got_d, results[0][(tuple(split), name)][0])  # the same bits on every rank
    assert results[0]["sharded"] == 1  # z = J̃g went through the parameter-sharded rows too

    # 5 optimizer steps (mc, Adam metric, momentum, Armijo, adaptive damping) against one process
    state = results[0]["generator"]
    assert all(torch.equal(res["generator"], state) for res in results)  # rank 0's seed on every rank
    want_steps, want_params = reference_steps(state.numpy().tobytes())
    for res in results:
        assert torch.equal(res["params"], results[0]["params"])
        assert rel_err([res["params"]], [want_params]) < 1e-10, rel_err([res["params"]], [want_params])
        for (loss, accepted, damping), (want_loss, want_accepted, want_damping) in zip(res["steps"], want_steps, strict=True):
            assert abs(loss - want_loss) < 1e-12 * want_loss and accepted == want_accepted and damping == want_damping
    assert sum(accepted for _, accepted, _ in want_steps) >= 4  # the metric and momentum carry over accepted steps

    for res in results:  # a rank failing before the mid-build sync: every rank raises, naming it
        raised = res["raised"]
        assert raised["targets"][0] == "ValueError" and raised["targets"][1].startswith(f"rank 1 of {world}:")
        assert "out of range" in raised["targets"][1]
        assert raised["forward"] == ("RuntimeError", f"rank {world - 1} of {world}: this rank's data loader broke")
        assert raised["generator"][0] == "ValueError" and "generator state of rank(s) [1] differs" in raised["generator"][1]
        assert "curvature='mc' with distributed='local' is not supported" in raised["local_mc"][1]
        assert "per-token targets (b, T) with distributed='local' are not supported" in raised["local_token"][1]
        assert "metric='adam' with distributed='local' is not supported" in raised["local_metric"][1]
        assert rel_err([raised["after"]], [ref["token_mc"][0]]) < 1e-10


def test_lm_rows_on_2_ranks_equal_one_process_for_two_splits():
    check_ranks(run_ranks(cases.lm_ranks, 2, timeout=60.0), 2)


def test_lm_rows_on_3_ranks_equal_one_process_for_two_splits():
    check_ranks(run_ranks(cases.lm_ranks, 3, timeout=60.0), 3)


def test_one_process_reference_is_the_oracle_and_the_global_count_matters():
    """The single-process per-token mc direction is the dense oracle's for its draws; the global
    token mean differs from averaging the shards' own token means (what a per-rank count gives)."""
    model, ids, y = cases.lm_problem()
    d, samples, _ = reference()["token_mc"]
    assert rel_err([d], [cases.flat(mc_token_oracle(model, ids, y, samples, cases.LAM))]) < 1e-8
    loss = egn_fast.resolve_loss("cross_entropy")
    with torch.no_grad():
        whole = float(loss.batch_mean(model(ids), y))
        halves = [float(loss.batch_mean(model(ids[lo:hi]), y[lo:hi])) * (hi - lo) / cases.B for lo, hi in ((0, 2), (2, 6))]
    assert abs(sum(halves) - whole) > 1e-3 * whole


def test_draws_are_split_invariant_and_never_pick_a_zero_probability_class():
    """Shards bound to their BatchShare draw exactly the whole batch's labels (cross-entropy per
    token and per sample, mse, bce); inverse-CDF labels follow softmax(f) and skip p = 0."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 3 * 4, generator=g, dtype=torch.float64)
    f[:, 2::4] = -1e4  # class 2 of every token: probability exactly 0
    y = torch.randint(4, (6, 3), generator=g)
    y[1, 0] = -100
    problems = [("cross_entropy", f, y), ("cross_entropy", f[:, :4], y[:, 0].clamp(min=0)), ("mse", f, f.flip(1)),
              ("bce", f, torch.rand(6, 12, generator=g, dtype=torch.float64))]
    for name, outputs, targets in problems:
        loss = egn_fast.resolve_loss(name)
        tokens = loss.count_tokens(targets)
        whole = loss.sample_targets(outputs, targets, 3, torch.Generator().manual_seed(5))
        for split in ([2, 4], [1, 2, 3], [5, 1]):
            parts = []
            for r, n in enumerate(split):
                lo = sum(split[:r])
                bound = loss.with_share(BatchShare(lo, 6, tokens))
                parts.append(bound.sample_targets(outputs[lo:lo + n], targets[lo:lo + n], 3, torch.Generator().manual_seed(5)))
            assert torch.equal(torch.cat(parts, 1), whole), (name, split)
    labels = egn_fast.resolve_loss("cross_entropy").sample_targets(f[:2], y[:2].clamp(min=0), 20_000, torch.Generator().manual_seed(1))
    p = torch.softmax(f[:2].view(2, 3, 4), 2)
    freq = torch.nn.functional.one_hot(labels, 4).double().mean(0)
    assert not (labels == 2).any() and (freq - p).abs().max() < 0.015
