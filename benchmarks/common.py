"""What the benchmark scripts share: machine info, timers, the relative error, peak memory.

* `machine_info()`: platform, CPU model, Python, torch and its thread count (the "machine" entry
  of the step-time and convergence reports).
* CPU timers of the step-time benchmarks: `Samples` (perf_counter wall times and minor page
  faults of back-to-back calls) and `time_methods` (ROUNDS rounds of warm-up + timed calls per
  method, so that drift of the machine hits every method alike); their command-line options
  and set-up (`add_cpu_run_options`, `start_cpu_run`).
* `median_ms`: the kernel benchmarks' timer, the median of CUDA-event intervals (wall-clock
  on the CPU, where the tests run kernels.py in Triton's interpreter).
* `rel_err`: ‖got − want‖ / ‖want‖ in float64, of two tensors or of two lists of tensors (a
  direction, parameter by parameter).
* `peak_rss_increase`: the peak resident-set increase of one call (Linux).
* `comma_names`: a --tasks/--optimizers comma list checked against the known names.
* `gpu_slug` (a GPU's name in result file names) and `AUTO_MIN_SPEEDUP`, the speed-up over torch
  an accelerated backend needs to take an op in egn_fast/ops/auto_table.json.

Scripts import it as `common` (each puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import math
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

import egn_fast

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3  # rounds of `time_methods`
# An accelerated backend replaces torch for an op in the auto table only if its median time
# ratio over the op's cases beats torch by this factor (noise must not flip the table).
AUTO_MIN_SPEEDUP = 1.05


def machine_info() -> dict:
    """Platform, CPU model, torch version and thread count."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- timers


@dataclass
class Samples:
    """Wall times (ms) and minor page faults of the timed calls of one method."""

    ms: list[float] = field(default_factory=list)
    faults: int = 0

    def time_calls(self, fn: Callable[[], object], calls: int) -> None:
        """Time `calls` back-to-back calls of fn, one perf_counter interval each."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            self.ms.append((time.perf_counter() - t0) * 1e3)
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def time_methods(
    methods: dict[str, Callable[[], object]],
    repeats: int | dict[str, int],
    warmup: int | dict[str, int],
    desc: str,
) -> dict[str, Samples]:
    """ROUNDS rounds; in each, every method gets `warmup` untimed calls, then its share of
    `repeats` timed calls back to back (warm caches, as in a training loop). Rounds spread
    slow drift of the machine over all methods alike. `repeats` and `warmup` are one number for
    all methods or one per method (the sweep gives slow methods fewer calls)."""
    repeats = repeats if isinstance(repeats, dict) else dict.fromkeys(methods, repeats)
    warmup = warmup if isinstance(warmup, dict) else dict.fromkeys(methods, warmup)
    samples = {k: Samples() for k in methods}
    with tqdm(total=ROUNDS * len(methods), desc=desc, leave=False) as bar:
        for _ in range(ROUNDS):
            for k, fn in methods.items():
                for _ in range(warmup[k]):
                    fn()
                samples[k].time_calls(fn, math.ceil(repeats[k] / ROUNDS))
                bar.update()
    return samples


def add_cpu_run_options(parser: argparse.ArgumentParser, data_files: str) -> None:
    """--out, --data-dir (the directory with `data_files`) and --reuse-cpu-memory: the options the
    step-time benchmarks share besides --repeats and --quick."""
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"directory with {data_files} (default: $EGN_FAST_DATA; random data without either)")
    parser.add_argument("--reuse-cpu-memory", action="store_true", help="call egn_fast.reuse_cpu_memory() first "
                        "(glibc keeps freed blocks; applies to every method)")


def start_cpu_run(args: argparse.Namespace) -> tuple[int, int, str]:
    """Act on the options of `add_cpu_run_options`, --repeats and --quick: egn_fast.reuse_cpu_memory()
    if asked (exit where it is not available), create --out. Returns the timed calls per method (30,
    6 with --quick, unless --repeats), the warm-up calls per method and round (2, 1 with --quick) and
    the suffix of the result files' names."""
    if args.reuse_cpu_memory and not egn_fast.reuse_cpu_memory():
        raise SystemExit("egn_fast.reuse_cpu_memory() is not available here (not glibc)")
    suffix = "_reuse_cpu_memory" if args.reuse_cpu_memory else ""
    repeats = args.repeats or (6 if args.quick else 30)
    warmup = 1 if args.quick else 2
    args.out.mkdir(parents=True, exist_ok=True)
    return repeats, warmup, suffix


def median_ms(fn: Callable[[], object], warmup: int, reps: int, device: str = "cuda") -> float:
    """Median of `reps` CUDA-event intervals of fn() after `warmup` untimed calls; on another
    device, of `reps` perf_counter intervals (wall-clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        samples = Samples()
        samples.time_calls(fn, reps)
        return samples.median
    times = []
    torch.cuda.synchronize()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# --------------------------------------------------------------------------- errors and memory


def _float64(x: Tensor | Sequence[Tensor]) -> Tensor:
    """A tensor in float64; a list of tensors as one flat float64 vector."""
    if isinstance(x, Tensor):
        return x.double()
    return torch.cat([t.double().reshape(-1) for t in x])


def rel_err(got: Tensor | Sequence[Tensor], want: Tensor | Sequence[Tensor], floor: float = 0.0) -> float:
    """‖got − want‖ / max(‖want‖, floor) in float64, over all elements (of all tensors of a list:
    a direction, parameter by parameter). floor > 0 keeps the error finite for a zero `want`."""
    g, w = _float64(got), _float64(want)
    return float((g - w).norm() / w.norm().clamp(min=floor))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def _status_bytes(field_name: str) -> int:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def peak_rss_increase(fn: Callable[[], object]) -> int | None:
    """Peak resident-set increase (bytes) during one call of fn, or None where the kernel's peak
    cannot be reset. gc.collect() and glibc's malloc_trim(0) first (freed memory goes back to
    the system, so the call must touch fresh pages for what it allocates), then "5" written to
    /proc/self/clear_refs resets VmHWM to the current VmRSS; peak = VmHWM after − VmRSS before.
    Memory a library keeps cached across calls (e.g. a JIT's buffers) is not counted."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    return peak - before


def comma_names(text: str, known: Sequence[str], what: str, script: str, aliases: dict[str, str] | None = None) -> list[str]:
    """The names of a comma list (`aliases` maps other spellings, lower-case, to names); exits with
    one line naming the unknown ones and the choices."""
    aliases = aliases or {}
    names = [aliases.get(n.strip().lower(), n.strip()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise SystemExit(f"{script}: unknown {what} {unknown}; choose from {list(known)}")
    return names


def gpu_slug(name: str) -> str:
    """A GPU's name as it appears in result file names: "NVIDIA H200 (141GB)" → "nvidia_h200__141gb"."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
