"""Seconds per stage, for `timings=True`.

A GPU runs kernels asynchronously: the clock is read only after the device has finished the
stage's work (torch.cuda.synchronize), or the stage that happens to wait would be charged for
all earlier ones. Without timings nothing is synchronized and nothing is recorded.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["StageClock"]


class StageClock:
    """`with clock("gram"): ...` adds the stage's seconds to `clock.seconds["gram"]` (when enabled)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
