"""benchmarks/dqn_agent.py, dqn_report.py and dqn.py: the replay buffer, ε, the target update, the TD
target against a hand computation, the EGN closure, short real runs on gymnasium and MinAtar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gymnasium  # installed by requirements.txt: a missing install fails, it is not skipped
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dqn  # noqa: E402
import dqn_agent  # noqa: E402
import dqn_report  # noqa: E402

from egn_fast import EGN  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_replay_buffer_keeps_the_last_capacity_transitions():
    buffer = dqn_agent.ReplayBuffer(capacity=4, obs_shape=(2,), seed=0)
    for i in range(6):  # transitions 0 and 1 are overwritten by 4 and 5
        buffer.add(np.array([i, -i], dtype=np.float32), action=i % 3, reward=10.0 + i,
                   next_obs=np.array([i + 1, 0], dtype=np.float32), terminated=i == 5)
    assert buffer.size == 4 and buffer.position == 2
    batch = buffer.sample(64)
    assert batch.obs.shape == (64, 2) and batch.actions.dtype == torch.int64 and batch.actions.shape == (64,)
    stored = set(batch.obs[:, 0].tolist())
    assert stored <= {2.0, 3.0, 4.0, 5.0} and len(stored) > 1
    # every field of a sampled row comes from the same transition
    i = batch.obs[:, 0]
    assert torch.equal(batch.rewards, 10.0 + i) and torch.equal(batch.next_obs[:, 0], i + 1)
    assert torch.equal(batch.actions, (i.long() % 3)) and torch.equal(batch.terminated, (i == 5).float())


def test_replay_buffer_refuses_an_empty_sample():
    with pytest.raises(ValueError, match="empty"):
        dqn_agent.ReplayBuffer(3, (1,)).sample(2)


def test_linear_epsilon():
    eps = [dqn_agent.linear_epsilon(1.0, 0.05, 100, s) for s in (0, 50, 100, 1000)]
    assert eps == pytest.approx([1.0, 0.525, 0.05, 0.05])


def test_hard_update_copies_weights_into_a_separate_target():
    online = dqn_agent.q_mlp(4, 2, seed=0)
    target = dqn_agent.target_network(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.equal(online[0].weight, target[0].weight)
    dqn_agent.hard_update(target, online)
    for p, q in zip(online.parameters(), target.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    assert all(not p.requires_grad for p in target.parameters())


def test_td_targets_against_a_hand_computation():
    target = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    batch = dqn_agent.Batch(obs=torch.zeros(3, 2), actions=torch.tensor([0, 1, 2]),
                            rewards=torch.tensor([1.0, -2.0, 0.5]),
                            next_obs=torch.tensor([[2.0, -1.0], [-3.0, -4.0], [1.0, 1.0]]),
                            terminated=torch.tensor([0.0, 0.0, 1.0]))
    # Q'(s') rows: [2, -1, 1] → max 2; [-3, -4, -7] → max -3; terminal row: no bootstrap
    want = torch.tensor([1.0 + 0.9 * 2.0, -2.0 + 0.9 * -3.0, 0.5])
    assert torch.allclose(dqn_agent.td_targets(target, batch, gamma=0.9), want)


def random_batch(b: int = 16, seed: int = 0) -> dqn_agent.Batch:
    g = torch.Generator().manual_seed(seed)
    return dqn_agent.Batch(torch.randn(b, 4, generator=g), torch.randint(0, 2, (b,), generator=g),
                           torch.randn(b, generator=g), torch.randn(b, 4, generator=g), torch.zeros(b))


def test_td_closure_gathers_the_taken_actions():
    q_net, batch = dqn_agent.q_mlp(4, 2, seed=1), random_batch()
    targets = torch.linspace(-1, 1, 16)
    outputs, y = dqn_agent.td_closure(q_net, batch, targets)()
    q = q_net(batch.obs)
    assert outputs.shape == (16, 1) and y.shape == (16, 1)
    assert torch.equal(outputs[:, 0], torch.stack([q[i, batch.actions[i]] for i in range(16)]))
    assert torch.equal(y[:, 0], targets) and outputs.requires_grad


@pytest.mark.parametrize("make", [lambda m: EGN(m, loss="mse", damping=1.0),
                                  lambda m: EGN(m, loss="mse", damping=1.0, line_search="armijo"),
                                  lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)])
def test_train_step_lowers_the_td_error_of_the_batch(make):
    q_net, batch = dqn_agent.q_mlp(4, 2, seed=2), random_batch(seed=3)
    closure = dqn_agent.td_closure(q_net, batch, torch.randn(16, generator=torch.Generator().manual_seed(4)) * 3)
    def td_error() -> float:
        with torch.no_grad():
            outputs, y = closure()
            return float(0.5 * (outputs - y).pow(2).mean())

    before = td_error()
    assert dqn_agent.train_step(make(q_net), closure) == pytest.approx(before, rel=1e-5)  # the loss before the step
    assert td_error() < 0.9 * before


def test_egn_closure_step_equals_the_regression_on_the_gathered_outputs():
    """EGN on the closure takes the step of an ordinary mse regression whose model outputs Q(s)[a]."""
    batch = random_batch(seed=5)
    targets = torch.randn(16, generator=torch.Generator().manual_seed(6))
    a, b = dqn_agent.q_mlp(4, 2, seed=7), dqn_agent.q_mlp(4, 2, seed=7)
    EGN(a, loss="mse", damping=0.5).step(closure=dqn_agent.td_closure(a, batch, targets))

    class Gathered(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).gather(1, batch.actions[:, None])

    EGN(Gathered(b), loss="mse", damping=0.5).step(batch.obs, targets[:, None])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.equal(a[0].weight, dqn_agent.q_mlp(4, 2, seed=7)[0].weight)


def test_run_dqn_on_cartpole_counts_steps_and_updates():
    env = gymnasium.make("CartPole-v1")
    config = dqn_agent.DQNConfig(total_steps=600, learning_starts=200, train_every=10, batch_size=32,
                                 buffer_size=500, target_every=100)
    net = dqn_agent.q_mlp(4, 2, seed=0)
    start = [p.clone() for p in net.parameters()]
    episodes = dqn_agent.run_dqn(env, net, lambda m: EGN(m, loss="mse", damping=10.0), config, seed=0)
    assert episodes.optimizer_steps == 40
    assert len(episodes.returns) >= 3 and all(r >= 8 for r in episodes.returns)  # CartPole: +1 per step
    assert episodes.steps == sorted(episodes.steps) and episodes.steps[-1] <= 600
    # a return is the length of its episode in CartPole
    lengths = np.diff([0] + episodes.steps)
    assert list(lengths) == [int(r) for r in episodes.returns]
    assert any(not torch.equal(p, q) for p, q in zip(start, net.parameters()))


def test_run_dqn_stops_when_the_td_targets_blow_up():
    config = dqn_agent.DQNConfig(total_steps=600, learning_starts=100, train_every=2, batch_size=32, target_every=20)
    make_sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e6)  # noqa: E731
    with pytest.raises(dqn_agent.Diverged, match="non-finite TD targets"):
        dqn_agent.run_dqn(gymnasium.make("CartPole-v1"), dqn_agent.q_mlp(4, 2, seed=0), make_sgd, config, seed=0)


def test_minatar_freeway_env_and_conv_net():
    env = dqn_agent.MinAtarEnv("freeway", max_steps=5)
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.obs_shape and obs.shape[1:] == (10, 10) and obs.dtype == np.float32 and obs.any()
    q = dqn_agent.q_conv(env.obs_shape[0], env.num_actions, seed=0)(torch.as_tensor(obs)[None])
    assert q.shape == (1, env.num_actions)
    truncated = [env.step(1)[3] for _ in range(5)]
    assert truncated == [False] * 4 + [True]


def run_record(returns: list[float], steps: list[int], total: int, diverged: str | None = None) -> dict:
    return {"steps": total, "diverged": diverged,
            "episodes": {"steps": steps, "seconds": [s / 100 for s in steps], "returns": returns}}


def test_final_return_and_target_crossing():
    returns = [10.0] * 10 + [500.0] * 10
    steps = list(range(10, 210, 10))
    run = run_record(returns, steps, total=200)
    assert dqn_report.final_return(run) == 500.0  # episodes ending after step 180: 190, 200
    # the 10-episode mean first reaches 475 at the 20th episode (all 500s)
    assert dqn_report.to_target(run, 475.0) == (200, 2.0)
    # it reaches 255 = (5·10 + 5·500) / 10 at the 15th episode
    assert dqn_report.to_target(run, 255.0) == (150, 1.5)
    assert dqn_report.to_target(run, 501.0) == (None, None)
    assert dqn_report.final_return(run_record(returns, steps, 200, diverged="nan")) == -math.inf
    curve = dqn_report.curve(run)
    assert curve["return"][0] is None and curve["return"][-1] == 500.0 and curve["seconds"][-1] == 2.0


def test_quick_script_writes_json_md_png(tmp_path):
    dqn.main(["--quick", "--tasks", "cartpole", "--optimizers", "egn,sgd", "--jobs", "1",
              "--out", str(tmp_path), "--cache", str(tmp_path / "runs.json")])
    data = json.loads((tmp_path / "dqn_cpu_quick.json").read_text())
    rows = data["tasks"]["CartPole-v1"]
    assert set(rows) == {"egn", "sgd"} and len(rows["egn"]["seeds"]) == 1
    assert rows["egn"]["seeds"][0]["optimizer_steps"] > 0 and rows["egn"]["final_return"]["mean"] > 0
    assert "| egn |" in (tmp_path / "dqn_cpu_quick.md").read_text()
    assert (tmp_path / "dqn_cpu_quick.png").stat().st_size > 1000


class FakePool:
    """Records submissions instead of running them."""

    def __init__(self) -> None:
        self.submitted: list[tuple] = []

    def submit(self, fn, *args):
        self.submitted.append(args)
        return object()


def test_tuning_extends_a_winning_edge_and_keeps_an_inner_winner(tmp_path):
    task, spec = dqn.TASKS["CartPole-v1"], dqn.OPTIMIZERS["egn"]  # λ grid 1, 10, 100; ×10 beyond an edge
    pool = FakePool()
    scheduler = dqn.Scheduler(pool, {}, tmp_path / "c.json", quick=False, seeds=3, bar=None)
    steps = task.config.total_steps

    def finished(value: float, final: float) -> None:
        scheduler.cache[scheduler.key(task, spec, value, 0)] = run_record([final], [steps], steps)

    for value, final in ((1.0, 50.0), (10.0, 120.0), (100.0, 300.0)):
        finished(value, final)
    grid = [1.0, 10.0, 100.0]
    assert scheduler.decide(task, spec, grid) is None and grid[-1] == 1000.0  # the edge won: one more point
    assert pool.submitted == [("CartPole-v1", "egn", 1000.0, 0, False)]
    finished(1000.0, 80.0)
    assert scheduler.decide(task, spec, grid) == 100.0  # now inside its grid
    finished(10000.0, 500.0)
    grid += [10000.0]
    assert scheduler.decide(task, spec, grid) == 10000.0  # at most two extensions: an edge may stay
