"""Real torch.distributed process groups for the tests: `run_ranks(fn, world, *args)` spawns
`world` processes (gloo on 127.0.0.1, a free port each call), runs fn(rank, world, *args) on each
and returns their results in rank order. Collectives time out after `timeout` s and the parent
kills the processes after it too, so a hang fails the test instead of stalling CI."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init: else its group.WORLD defaults outlive destroy (examples/torchrun_egn.py)
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, timeout: float, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        # fn's models and optimizers can hold the group through reference cycles (FSDP's modules);
        # alive at exit, gloo's threads abort the process (pytorch/pytorch#117762)
        gc.collect()
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 30.0, dead: tuple[int, ...] = ()) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned gloo ranks; their return values, rank order.
    dead: ranks expected to die on their own (a fault test): the others' values are returned."""
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx = mp.start_processes(
            _worker, args=(world, free_port(), out_dir, timeout, fn, args), nprocs=world, join=False, start_method="spawn"
        )
        end = time.monotonic() + max(2 * timeout, 60.0)  # start-up and imports take seconds of their own
        survivors = [r for r in range(world) if r not in dead]
        try:
            if dead:  # join() raises on the dead rank's exit code: watch the survivors' results instead
                # (their process-group teardown may wait for the dead rank: they are killed below)
                def pending() -> list[int]:
                    return [r for r in survivors if ctx.processes[r].is_alive() and not (Path(out_dir) / f"rank{r}.pt").exists()]

                while pending() and time.monotonic() < end:
                    time.sleep(0.1)
                time.sleep(0.2)  # torch.save closes the file
            else:
                while not ctx.join(timeout=max(0.1, end - time.monotonic())):  # True once all have exited
                    if time.monotonic() > end:
                        break
            if time.monotonic() > end:
                raise TimeoutError(f"{world} ranks did not finish within {max(2 * timeout, 60.0)} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in survivors]
