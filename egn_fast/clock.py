"""Seconds per stage, for `timings=True`.

A GPU runs kernels asynchronously: the clock is read only after the device has finished the
stage's work (torch.cuda.synchronize), or the stage that happens to wait would be charged for
all earlier ones. Without timings nothing is synchronized and nothing is recorded.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

__all__ = ["StageClock"]


class StageClock:
    """`with clock("gram"): ...` adds the stage's seconds to `clock.seconds["gram"]` (when enabled).
    A plain context manager, not a generator: a step enters about ten stages."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> "_Stage | nullcontext[None]":
        return _Stage(self, stage) if self.enabled else _UNTIMED


_UNTIMED = nullcontext()


class _Stage:
    __slots__ = ("clock", "stage", "t0")

    def __init__(self, clock: StageClock, stage: str):
        self.clock, self.stage, self.t0 = clock, stage, 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        clock = self.clock
        if clock.device.type == "cuda":
            torch.cuda.synchronize(clock.device)
        clock.seconds[self.stage] = clock.seconds.get(self.stage, 0.0) + time.perf_counter() - self.t0
