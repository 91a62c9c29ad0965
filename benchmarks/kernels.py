"""Kernel microbenchmark (needs a CUDA GPU): every accelerated backend's gram_dense, gram_seq and
backproject against the torch backend and against a cuBLAS GEMM of equal FLOPs, side by side in
one process, on a grid of shapes.

    python benchmarks/kernels.py                       # full grid
    python benchmarks/kernels.py --quick               # a few shapes (make gpu-check)
    python benchmarks/kernels.py --write-auto-table    # also rewrite egn_fast/ops/auto_table.json

Each timing is the median of CUDA-event intervals of back-to-back calls after warm-up (the first
call autotunes). "GEMM" is torch.matmul (cuBLAS) in the same dtype and precision mode, sized to
the op's FLOPs (for backproject: the very GEMM Uᵀ A it fuses): the practical roofline. Every
backend's output is also compared with torch's (rel err) so a fast wrong kernel shows.

Writes <out>/kernels_<gpu>.json and .md (default out: benchmarks/results) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AUTO_MIN_SPEEDUP, gpu_slug, median_ms, rel_err  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# main() needs "cuda"; the tests run measure() on tiny shapes on the CPU (Triton interpreter).
DEVICE = "cuda"
OPS = ["gram_dense", "gram_seq", "backproject"]
# precision modes: factor dtype and whether fp32 matmuls (torch's and the kernels') may use TF32
MODES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}

# (b, s, in, out)
GRAM_DENSE = [(256, 1, 256, 256), (1024, 1, 1024, 1024), (1024, 1, 8192, 8192), (4096, 1, 1024, 1024), (4096, 1, 8192, 256), (400, 10, 1024, 1024)]
GRAM_DENSE_QUICK = [(1024, 1, 1024, 1024), (4096, 1, 1024, 1024), (400, 10, 1024, 1024)]
# (b, s, T, in, out)
GRAM_SEQ = [(32, 1, 128, 256, 256), (32, 1, 512, 256, 256), (32, 1, 1024, 256, 256), (64, 1, 512, 512, 512), (8, 4, 256, 256, 256)]
GRAM_SEQ_QUICK = [(32, 1, 512, 256, 256), (8, 4, 256, 256, 256)]
BACKPROJECT = [(4096, 1, 1, 1024, 1024), (4096, 10, 1, 4096, 4096), (64, 1, 512, 1024, 1024), (64, 1, 512, 8192, 8192), (64, 4, 512, 4096, 4096)]
BACKPROJECT_QUICK = [(4096, 1, 1, 1024, 1024), (64, 4, 512, 4096, 4096)]


@dataclass
class Case:
    """One op on one shape: `run(ops)` calls the op of backend `ops` on fixed inputs and returns
    its output; flops and bytes are the op's own work (lower triangle only for a Gram);
    gemm_mnk and gemm_dtype: the cuBLAS GEMM it is compared with."""

    op: str
    shape: dict[str, int]
    flops: float
    bytes: float
    gemm_mnk: tuple[int, int, int]
    gemm_dtype: torch.dtype
    run: Callable[[object], torch.Tensor]


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def gram_dense_case(b: int, s: int, n_in: int, n_out: int, dtype: torch.dtype) -> Case:
    m = b * s
    A, G = _randn(b, n_in, dtype=dtype), _randn(b, s, n_out, dtype=dtype)
    K = torch.zeros(m, m, device=DEVICE)

    def run(ops) -> torch.Tensor:
        K.zero_()
        ops.gram_dense(K, A, G, True)
        return K

    flops = m * m * n_out + b * b * n_in  # 2 per multiply-add, half of each symmetric product
    io = (A.numel() + G.numel()) * A.element_size() + 2 * 4 * m * m
    return Case("gram_dense", dict(b=b, s=s, T=1, n_in=n_in, n_out=n_out), flops, io, _square_gemm(m, flops), dtype, run)


def gram_seq_case(b: int, s: int, T: int, n_in: int, n_out: int, dtype: torch.dtype) -> Case:
    m = b * s
    A, G = _randn(b, T, n_in, dtype=dtype), _randn(b, s, T, n_out, dtype=dtype)
    K = torch.zeros(m, m, device=DEVICE)

    def run(ops) -> torch.Tensor:
        K.zero_()
        ops.gram_seq(K, A, G, True)
        return K

    flops = T * T * (m * m * n_out + b * b * n_in)
    io = (A.numel() + G.numel()) * A.element_size() + 2 * 4 * m * m
    return Case("gram_seq", dict(b=b, s=s, T=T, n_in=n_in, n_out=n_out), flops, io, _square_gemm(m * T, flops), dtype, run)


def backproject_case(b: int, s: int, T: int, n_in: int, n_out: int, dtype: torch.dtype) -> Case:
    A, G = _randn(b, T, n_in, dtype=dtype), _randn(b, s, T, n_out, dtype=dtype)
    u = torch.randn(b, s, device=DEVICE)

    def run(ops) -> torch.Tensor:
        dW, db = ops.backproject(A, G, u, True)
        return torch.cat([dW.reshape(-1), db])

    flops = 2 * n_out * n_in * b * T + 2 * b * s * T * n_out
    io = (A.numel() + G.numel()) * A.element_size() + 4 * n_out * (n_in + 1)
    # the GEMM it fuses, Uᵀ A, runs in u's dtype (fp32) whatever the factors' dtype, as in torch
    return Case("backproject", dict(b=b, s=s, T=T, n_in=n_in, n_out=n_out), flops, io, (n_out, n_in, b * T), u.dtype, run)


def _square_gemm(rows: int, flops: float) -> tuple[int, int, int]:
    """A (rows × k) @ (k × rows) GEMM with about `flops` FLOPs (k a multiple of 64)."""
    rows = min(rows, 16384)  # keep the GEMM's operands small; its TFLOP/s is what is used
    k = max(64, round(flops / (2 * rows * rows) / 64) * 64)
    return rows, rows, min(k, 65536)


def cases(quick: bool, dtype: torch.dtype) -> Iterator[Case]:
    for shape in GRAM_DENSE_QUICK if quick else GRAM_DENSE:
        yield gram_dense_case(*shape, dtype)
    for shape in GRAM_SEQ_QUICK if quick else GRAM_SEQ:
        yield gram_seq_case(*shape, dtype)
    for shape in BACKPROJECT_QUICK if quick else BACKPROJECT:
        yield backproject_case(*shape, dtype)


@contextlib.contextmanager
def fp32_precision(tf32: bool) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def gemm_tflops(mnk: tuple[int, int, int], dtype: torch.dtype, reps: int) -> float:
    """TFLOP/s of a cuBLAS GEMM (M×K)@(K×N) in `dtype` (fp32 accumulate)."""
    M, N, Kd = mnk
    x, y = _randn(M, Kd, dtype=dtype), _randn(Kd, N, dtype=dtype)
    ms = median_ms(lambda: x @ y, 3, reps, DEVICE)
    return 2 * M * N * Kd / ms / 1e9


def accelerated_backends() -> dict[str, dict[str, object]]:
    """op -> {name: backend} for every registered backend other than torch that implements the
    op itself and runs on CUDA."""
    from egn_fast import ops

    found: dict[str, dict[str, object]] = {op: {} for op in OPS}
    for name in ops.available_backends():
        if name == "torch":
            continue
        try:
            backend = ops.get_backend(name, torch.device(DEVICE))
        except (ImportError, RuntimeError, ValueError) as err:
            print(f"[skip] backend {name!r}: {err}", file=sys.stderr)
            continue
        for op in OPS:
            if getattr(type(backend), op) is not getattr(ops.Backend, op):
                found[op][name] = backend
    return found


def measure(quick: bool, reps: int) -> list[dict]:
    from egn_fast import ops

    torch_ops = ops.get_backend("torch", torch.device(DEVICE))
    backends = accelerated_backends()
    rows = []
    for mode, (dtype, tf32) in MODES.items():
        with fp32_precision(tf32):
            for case in cases(quick, dtype):
                want = case.run(torch_ops).clone()
                torch_ms = median_ms(lambda: case.run(torch_ops), 2, reps, DEVICE)
                gemm = gemm_tflops(case.gemm_mnk, case.gemm_dtype, reps)
                for name, backend in backends[case.op].items():
                    err = rel_err(case.run(backend), want)
                    ms = median_ms(lambda: case.run(backend), 3, reps, DEVICE)
                    tflops = case.flops / ms / 1e9
                    row = dict(
                        op=case.op, mode=mode, backend=name, **case.shape, ms=ms, torch_ms=torch_ms,
                        speedup=torch_ms / ms, tflops=tflops, gbps=case.bytes / ms / 1e6,
                        gemm_tflops=gemm, of_gemm=tflops / gemm, rel_err=err,
                    )
                    rows.append(row)
                    print(format_row(row), flush=True)
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ tables (no GPU needed below)

COLUMNS = ["op", "mode", "backend", "b", "s", "T", "n_in", "n_out", "ms", "torch_ms", "speedup", "tflops", "gbps", "gemm_tflops", "of_gemm", "rel_err"]
HEADERS = ["op", "mode", "backend", "b", "s", "T", "in", "out", "ms", "torch ms", "× torch", "TFLOP/s", "GB/s", "GEMM TFLOP/s", "of GEMM", "rel err"]


def format_row(row: dict) -> str:
    cells = []
    for col in COLUMNS:
        v = row[col]
        if col == "rel_err":
            cells.append(f"{v:.1e}")
        elif col == "of_gemm":
            cells.append(f"{100 * v:.0f}%")
        elif isinstance(v, float):
            cells.append(f"{v:.3g}")
        else:
            cells.append(str(v))
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += [format_row(r) for r in rows]
    lines += ["", "Median speed-up over torch per op and backend: " + ", ".join(
        f"{op}/{name} {x:.2f}×" for (op, name), x in sorted(median_speedups(rows).items()))]
    return "\n".join(lines) + "\n"


def median_speedups(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(op, backend) -> median of torch time / backend time over the op's cases and modes."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["backend"]), []).append(r["speedup"])
    return {key: statistics.median(v) for key, v in groups.items()}


def auto_choices(rows: list[dict]) -> dict[str, str]:
    """op -> fastest backend on CUDA: the best median speed-up if it is ≥ AUTO_MIN_SPEEDUP, else torch."""
    best: dict[str, tuple[float, str]] = {}
    for (op, name), x in median_speedups(rows).items():
        if x >= AUTO_MIN_SPEEDUP and x > best.get(op, (0.0, ""))[0]:
            best[op] = (x, name)
    return {op: best[op][1] if op in best else "torch" for op in OPS}


def write_auto_table(rows: list[dict], gpu: str, path: Path) -> dict:
    """Rewrite the CUDA entries of the measured ops in auto_table.json; keep everything else."""
    table = json.loads(path.read_text())
    table["devices"].setdefault("cuda", {}).update(auto_choices(rows))
    speedups = ", ".join(f"{op}/{name} {x:.2f}×" for (op, name), x in sorted(median_speedups(rows).items()))
    table["note"] = (
        f"cuda choices from benchmarks/kernels.py on {gpu}: an op goes to the backend with the best "
        f"median speed-up over torch if it is ≥ {AUTO_MIN_SPEEDUP}× ({speedups}); cpu: torch"
    )
    table["measured_on"] = gpu
    path.write_text(json.dumps(table, indent=2) + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes (about a minute)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 20, 8 with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--write-auto-table", action="store_true", help="rewrite egn_fast/ops/auto_table.json from the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    import triton

    from egn_fast.ops import AUTO_TABLE_PATH

    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    rows = measure(args.quick, args.reps or (8 if args.quick else 20))
    meta = dict(
        gpu=gpu, torch=torch.__version__, triton=triton.__version__, quick=args.quick,
        seconds=round(time.perf_counter() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{gpu_slug(gpu)}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
    table = markdown(rows, f"Kernels on {gpu} (torch {meta['torch']}, triton {meta['triton']}, {meta['date']})")
    stem.with_suffix(".md").write_text(table)
    if args.write_auto_table:
        print("auto table:", json.dumps(write_auto_table(rows, gpu, AUTO_TABLE_PATH)["devices"]["cuda"]))
    print(table)
    if not math.isfinite(sum(r["rel_err"] for r in rows)) or any(r["rel_err"] > 1e-2 for r in rows):
        sys.exit("some backend's output differs from torch's by more than 1e-2 (see rel err)")


if __name__ == "__main__":
    main()
