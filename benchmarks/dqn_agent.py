"""DQN's pieces, written here (no RL framework), after CleanRL's dqn.py / dqn_atari.py.

* `ReplayBuffer`: a fixed-size ring of transitions (s, a, r, s', terminated), uniform sampling.
* `linear_epsilon`: ε decays linearly from `start` to `end` over a fraction of the run.
* `td_targets`: r + γ (1 − terminated) max_a' Q_target(s', a') (no gradient through the target).
* `hard_update`: the target network takes the online network's weights (every N steps).
* `td_closure`: the closure EGN's "mse" loss solves: outputs Q(s)[a] gathered at the taken
  actions (b, 1) and the TD targets (b, 1); the same loss (½ mean squared TD error) is backpropagated
  for Adam and SGD by `train_step`.
* `q_mlp` (classic control: the paper's 120-84 ReLU MLP) and `q_conv` (MinAtar: one 3×3 conv).
* `MinAtarEnv`: MinAtar's Environment behind gymnasium's reset/step, channels first.
* `run_dqn`: one training run; the record of every finished episode (env step, wall time, return).

The loss is egn_fast's "mse" (½ (Q − y)² per sample, batch mean) for every optimizer: CleanRL's
F.mse_loss without the ½, which only rescales Adam's and SGD's learning rates by 2.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from egn_fast import EGN, resolve_loss
from egn_fast.cli.training import make_mlp


@dataclass
class Batch:
    """A sampled mini-batch of transitions; actions (b,) int64, terminated (b,) float 0/1."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor


class ReplayBuffer:
    """The last `capacity` transitions in a ring; `sample` draws uniformly with replacement."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], seed: int = 0) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.position = 0  # where the next transition goes
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        i = self.position
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, float(terminated)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        if self.size == 0:
            raise ValueError("sampling from an empty replay buffer")
        idx = self.rng.integers(0, self.size, batch_size)
        return Batch(torch.from_numpy(self.obs[idx]), torch.from_numpy(self.actions[idx]),
                     torch.from_numpy(self.rewards[idx]), torch.from_numpy(self.next_obs[idx]),
                     torch.from_numpy(self.terminated[idx]))


def linear_epsilon(start: float, end: float, duration: int, step: int) -> float:
    """ε at env step `step`: from `start` down to `end` linearly over `duration` steps, then `end`."""
    return max(end, start + (end - start) * step / duration)


@torch.no_grad()
def td_targets(target_net: nn.Module, batch: Batch, gamma: float) -> Tensor:
    """r + γ (1 − terminated) max_a' Q_target(s', a'), shape (b,). Truncated episodes (time
    limits) are not terminal: their next state is bootstrapped."""
    next_q = target_net(batch.next_obs).max(dim=1).values
    return batch.rewards + gamma * (1.0 - batch.terminated) * next_q


def hard_update(target_net: nn.Module, online_net: nn.Module) -> None:
    """The target network takes the online network's weights (CleanRL's τ = 1)."""
    target_net.load_state_dict(online_net.state_dict())


def td_closure(q_net: nn.Module, batch: Batch, targets: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    """closure() -> (Q(s)[a] of the taken actions (b, 1), TD targets (b, 1)): the regression EGN's
    "mse" solves. It re-runs the forward pass when called, as EGN's line search needs."""
    targets = targets.reshape(-1, 1)
    actions = batch.actions.reshape(-1, 1)

    def closure() -> tuple[Tensor, Tensor]:
        return q_net(batch.obs).gather(1, actions), targets

    return closure


MSE = resolve_loss("mse")


class Diverged(RuntimeError):
    """The TD targets or the loss turned non-finite (the Q-values blew up)."""


def train_step(opt: torch.optim.Optimizer, closure: Callable[[], tuple[Tensor, Tensor]]) -> float:
    """One optimizer step on ½ mean (Q(s, a) − y)²; returns the loss before the step."""
    if isinstance(opt, EGN):
        return float(opt.step(closure=closure).loss)
    opt.zero_grad()
    outputs, targets = closure()
    loss = MSE.batch_mean(outputs, targets)
    loss.backward()
    opt.step()
    return float(loss.detach())


def q_mlp(num_inputs: int, num_actions: int, seed: int) -> nn.Sequential:
    """The paper's (and CleanRL's) classic-control Q-network: inputs-120-84-actions, ReLU."""
    return make_mlp(num_inputs, (120, 84), num_actions, seed, activation=nn.ReLU)


def q_conv(in_channels: int, num_actions: int, seed: int, side: int = 10) -> nn.Sequential:
    """MinAtar's small Q-network (Young & Tian 2019): conv 3×3 16 ch → ReLU → linear 128 → actions."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * (side - 2) ** 2, 128), nn.ReLU(), nn.Linear(128, num_actions),
    )


class MinAtarEnv:
    """MinAtar's Environment with gymnasium's reset/step: observations (channels, 10, 10) float32.
    MinAtar has no time limit of its own here; `max_steps` truncates an episode."""

    def __init__(self, game: str, max_steps: int = 2500) -> None:
        from minatar import Environment

        self.env = Environment(game, sticky_action_prob=0.1)
        self.max_steps = max_steps
        self.steps = 0
        self.num_actions = self.env.num_actions()
        self.obs_shape = tuple(np.moveaxis(self.env.state(), 2, 0).shape)

    def _obs(self) -> np.ndarray:
        return np.moveaxis(self.env.state(), 2, 0).astype(np.float32)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.env.seed(seed)
        self.env.reset()
        self.steps = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward, terminated = self.env.act(action)
        self.steps += 1
        return self._obs(), float(reward), bool(terminated), self.steps >= self.max_steps, {}


@dataclass
class DQNConfig:
    """CleanRL's dqn.py defaults, except the budget (`total_steps`) and the optimizer."""

    total_steps: int = 100_000
    buffer_size: int = 10_000
    gamma: float = 0.99
    target_every: int = 500  # env steps between hard target updates
    batch_size: int = 128
    start_epsilon: float = 1.0
    end_epsilon: float = 0.05
    exploration_fraction: float = 0.5  # of total_steps
    learning_starts: int = 10_000
    train_every: int = 10  # env steps per optimizer step


@dataclass
class Episodes:
    """One run's finished episodes: the env step and training wall time at which each ended, and
    its return; optimizer seconds (the steps only) and total seconds of the run."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    optimizer_seconds: float = 0.0
    total_seconds: float = 0.0
    optimizer_steps: int = 0


def run_dqn(env: Any, q_net: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer], config: DQNConfig,
            seed: int, progress: Callable[[int], None] | None = None) -> Episodes:
    """Train `q_net` by DQN on `env` (gymnasium's reset/step) for config.total_steps env steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    target_net = target_network(q_net)
    opt = make_opt(q_net)
    obs, _ = env.reset(seed=seed)
    buffer = ReplayBuffer(config.buffer_size, obs.shape, seed)
    num_actions = int(q_net(torch.as_tensor(obs)[None]).shape[1])
    episodes, episode_return = Episodes(), 0.0
    explore_steps = int(config.exploration_fraction * config.total_steps)
    started = time.perf_counter()
    for step in range(1, config.total_steps + 1):
        if rng.random() < linear_epsilon(config.start_epsilon, config.end_epsilon, explore_steps, step):
            action = int(rng.integers(num_actions))
        else:
            with torch.no_grad():
                action = int(q_net(torch.as_tensor(obs)[None]).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, reward, next_obs, terminated)
        episode_return += reward
        obs = next_obs
        if terminated or truncated:
            episodes.steps.append(step)
            episodes.seconds.append(time.perf_counter() - started)
            episodes.returns.append(episode_return)
            obs, _ = env.reset()
            episode_return = 0.0
        if step > config.learning_starts:
            if step % config.train_every == 0:
                batch = buffer.sample(config.batch_size)
                targets = td_targets(target_net, batch, config.gamma)
                if not torch.isfinite(targets).all():
                    raise Diverged(f"non-finite TD targets at env step {step}")
                t0 = time.perf_counter()
                train_step(opt, td_closure(q_net, batch, targets))
                episodes.optimizer_seconds += time.perf_counter() - t0
                episodes.optimizer_steps += 1
            if step % config.target_every == 0:
                hard_update(target_net, q_net)
        if progress is not None and step % 1000 == 0:
            progress(1000)
    episodes.total_seconds = time.perf_counter() - started
    return episodes


def target_network(net: nn.Module) -> nn.Module:
    """A deep copy of `net` with the same weights and no gradients."""
    target = copy.deepcopy(net)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
