"""Data-parallel EGN on real gloo process groups (spawned on the CPU, tests/distributed_harness.py)
against the single-process result on the concatenated batch (docs/design.md §6)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_cases as cases
from distributed_harness import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


def test_exact_direction_on_2_ranks_equals_single_process_on_the_whole_batch():
    grid = [(kind, loss, False) for kind in cases.EXACT_KINDS for loss in cases.LOSSES]
    grid += [("mlp", "mse", True), ("seq_linear", "cross_entropy", True), ("embedding", "bce", True)]
    check_exact(run_ranks(cases.exact_directions, 2, grid), grid)


def check_exact(results: list[dict], grid: list) -> None:
    """rank 0's direction within 1e-10 of the single-process one; every rank's the same bits."""
    sharded = {case: n for case, n in results[0].items() if case[0] == "sharded"}
    assert all(n == 1 for n in sharded.values())
    directions = {case: v for case, v in results[0].items() if case not in sharded}
    assert sorted(directions) == sorted(grid)
    assert {case: err for case, (_, err) in directions.items() if not err < 1e-10} == {}
    for other in results[1:]:
        assert all(torch.equal(other[case][0], d) for case, (d, _) in directions.items())


def test_3_ranks_exact_local_and_a_bad_rank_raises_everywhere():
    grid = [("mlp", "cross_entropy", False), ("embedding", "mse", False), ("norms", "bce", True), ("multihead_attention", "mse", False)]
    results = run_ranks(_three_rank_checks, 3, grid)
    check_exact([directions for directions, _, _ in results], grid)
    for directions, local, raised in results:
        assert local["err"] < 1e-10 and local["distance_to_exact"] > 1e-6  # an approximation, not exact
        for mode in ("exact", "local"):  # global gradient, sᵀHs and loss
            assert max(local[mode]) < 1e-10, (mode, local[mode])
        assert raised["nan"][0] == "NonFiniteError" and raised["nan"][1].startswith("rank 1 of 3:")
        assert raised["targets"][1].startswith("rank 2 of 3:") and "out of range" in raised["targets"][1]
        assert raised["skipped"][0] is False and raised["skipped"][1].startswith("rank 0 of 3:")
        assert raised["after"] < 1e-10
        assert "differ past the batch dimension" in raised["seq_len"]
        assert "rank(s) [1] differ from rank 0" in raised["replicas"]
        assert raised["mc"] < 1e-10 and raised["per_token"] < 1e-10  # refused before, now exact


def _three_rank_checks(rank, world, grid):
    return cases.exact_directions(rank, world, grid), cases.local_mode(rank, world), cases.bad_inputs(rank, world)


def test_5_egn_steps_on_2_ranks_equal_single_process_and_resume_exactly(tmp_path):
    results = run_ranks(cases.optimizer_steps, 2, str(tmp_path / "egn.pt"))
    for r in results:
        for momentum in (0.0, 0.9):
            assert r[momentum]["err"] < 1e-10
            assert r[momentum]["sharded"] == (momentum > 0)  # both exact routes are exercised
            assert all(same_accept and dloss < 1e-12 and same_damping for same_accept, dloss, same_damping in r[momentum]["infos"])
        assert r["resumed_equal"] and r["state_damping"]
    for momentum in (0.0, 0.9):  # bit-identical parameters on every rank
        assert torch.equal(results[0][momentum]["params"], results[1][momentum]["params"])


def test_the_readme_torchrun_example_runs_on_the_cpu():
    """examples/torchrun_egn.py under torchrun, 2 CPU processes, as the README launches it."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "examples" / "torchrun_egn.py"), "--steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 1: loss" in out.stdout and "2 ranks, identical parameters: True" in out.stdout
