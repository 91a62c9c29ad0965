"""Sharded parameters (FSDP2 `fully_shard`, HSDP) on real gloo process groups (spawned on the CPU,
tests/distributed_harness.py) against one process on the concatenated batch (docs/design.md §6)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp_cases as cases
from distributed_harness import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

KINDS = ["mlp", "seq_linear", "embedding", "norms", "custom_module", "multihead_attention", "shared_across_modules", "conv1d"]


def check(results: list[dict], grid: list) -> None:
    """Every case within 1e-10 of one process, placed like the parameters, the same on every rank;
    (HSDP) a replica with other values refused on every rank."""
    for r in results:
        if "replicas" in r:
            assert "with other values; HSDP needs its replicas equal" in r.pop("replicas")
    first = results[0]
    assert sorted(first) == sorted(grid)
    assert {case: err for case, (err, _, _) in first.items() if not err < 1e-10} == {}
    assert all(placed for r in results for _, placed, _ in r.values())
    for other in results[1:]:
        assert all(torch.equal(other[case][2], first[case][2]) for case in grid)


def test_fsdp_on_2_ranks_every_layer_kind_and_loss_is_exact():
    grid = [(kind, loss) for kind in KINDS for loss in ("mse", "cross_entropy", "bce")] + [("tiny_gpt", "mse"), ("gpt2", "mse")]
    check(run_ranks(cases.directions, 2, grid, False, timeout=120), grid)


@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp_4", "hsdp_2x2"])
def test_4_ranks_fsdp_and_hsdp_are_exact(hsdp):
    grid = [("mlp", "cross_entropy"), ("norms", "mse"), ("multihead_attention", "bce"), ("embedding", "cross_entropy"), ("tiny_gpt", "mse")]
    check(run_ranks(cases.directions, 4, grid, hsdp, timeout=120), grid)


def test_preconditioner_and_refusals():
    for r in run_ranks(cases.preconditioner_and_refusals, 2, timeout=60):
        assert r["preconditioner"] < 1e-10 and r["grad_placed"] and r["preconditioner_replicated"] < 1e-10
        assert "with sharded parameters use distributed='exact'" in r["local"]
        assert "which run over the ranks of the mesh" in r["alone"]
        assert r["one_sample"].startswith("rank 0 of 2 holds 1 sample: with sharded (FSDP) parameters")
        assert r["table"].startswith("rank 0 of 2: the model broadcasts a constant table itself")
        assert "parameter '0.weight' is placed as (Shard(dim=1),)" in r["shard_dim_1"]
        assert "parameter '0.weight' is a DTensor (Shard(dim=0),) that no fully_shard module manages" in r["not_fully_shard"]
        assert "parameter '0.parametrizations.weight.original' is sharded and parametrized" in r["parametrized"]


def test_5_egn_steps_equal_one_process_and_a_dcp_resume_is_bit_identical(tmp_path):
    for r in run_ranks(cases.optimizer_steps, 2, str(tmp_path / "ckpt"), timeout=120):
        assert r["err"] < 1e-10, r
        assert all(same_accept and dloss < 1e-12 and same_damping for same_accept, dloss, same_damping in r["infos"]), r["infos"]
        assert r["still_sharded"] and r["buffers_sharded"]
        assert r["resumed_equal"] and r["damping_equal"]


@pytest.mark.parametrize("world,hsdp", [(2, False), (4, True)], ids=["fsdp_2", "hsdp_2x2"])
def test_language_model_rows_per_token_exact_mc_and_empirical(world, hsdp):
    grid = [("tiny_gpt", "exact"), ("tiny_gpt", "mc"), ("tiny_gpt", "empirical"), ("gpt2", "mc")]
    check(run_ranks(cases.lm_rows, world, grid, hsdp, timeout=120), grid)


def test_5_steps_with_mc_rows_and_the_adam_metric_equal_one_process():
    for r in run_ranks(cases.lm_steps, 2, timeout=120):
        assert r["err"] < 1e-10, r  # Monte-Carlo rows and the metric over 5 steps: rounding grows to ~1e-11
        assert all(same_accept and dloss < 1e-10 and same_damping for same_accept, dloss, same_damping in r["infos"]), r["infos"]
        assert r["metric_sharded"] and r["accepted"] >= 3


def test_the_readme_fsdp_example_runs_under_torchrun(tmp_path):
    """examples/torchrun_fsdp_egn.py under torchrun, 2 CPU processes, as the README launches it."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "examples" / "torchrun_fsdp_egn.py"), "--steps", "3", "--checkpoint", str(tmp_path / "ckpt")]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2: loss" in out.stdout and "2 ranks, parameters still sharded: True" in out.stdout
    before, after = map(float, re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert after < 0.9 * before
    assert (tmp_path / "ckpt" / ".metadata").exists()


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_mid_step_makes_the_others_fail_not_wait(how):
    """Rank 1 exits (or hangs) inside its forward during the second step; rank 0 must raise within
    the process group's timeout (5 s here), naming itself, instead of waiting forever."""
    (elapsed, message), = run_ranks(cases.dead_rank, 2, how, timeout=5.0, dead=(1,))
    assert elapsed < 5.0 + 2.0, elapsed
    assert message.startswith("rank 0 of 2: a collective of the EGN step failed"), message
