"""Kernel microbenchmark of the "cuda" backend (egn_fast._C) against the torch backend, on a GPU.

Rows, each timed side by side in this process (CUDA events, median of --repeats calls after
warm-up) and checked against the torch result (rel err):
    gram_dense     K += (GGᵀ)∘(AAᵀ+1): fp32 exact, tf32, bf16 factors (fp32 K)
    backproject    dW = Σ (Σ_k u_k G_k) aᵀ: fp32, bf16 factors
    cholesky_solve cuSOLVER potrf+potrs vs torch.linalg.cholesky_ex + 2 triangular solves,
                   m = 256 … 8192, fp32 and fp64
    cholesky_batched, eigh  cuSOLVER potrfBatched / syevd vs torch.linalg
Writes <out>/kernels_cuda_<gpu>.json and .md (default out: benchmarks/results). Needs a CUDA GPU
and the built extension. (The Triton rows, and these kernels against an equal-FLOP cuBLAS GEMM, are in benchmarks/kernels.py.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AUTO_MIN_SPEEDUP, gpu_slug, median_ms, rel_err  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The solver ops only this script measures; kernels.py writes the Gram/back-projection entries of
# the auto table (it times triton and cuda side by side there).
SOLVER_OPS = ("cholesky_solve", "cholesky_batched", "eigh")
SOLVE_SIZES = [256, 512, 1024, 2048, 4096, 8192]
# (b, s, in, out): an MLP layer with MSE (s = 1), a CE head (s = 9) and a wide layer
GRAM_SHAPES = [(1024, 1, 1024, 1024), (256, 9, 512, 512), (512, 4, 4096, 1024)]
# (b, s, T, in, out)
BACKPROJECT_SHAPES = [(1024, 1, 1, 1024, 1024), (256, 9, 1, 512, 512), (32, 4, 128, 768, 768)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 repeats and m ≤ 1024, for a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--write-auto-table", action="store_true",
                        help="send the solver ops of egn_fast/ops/auto_table.json to cuda where it is faster")
    return parser.parse_args(argv)


def row(op: str, shape: str, dtype: str, cuda_fn: Callable, torch_fn: Callable, repeats: int) -> dict:
    """Time both implementations; cuda_fn/torch_fn return the tensor they compare on."""
    err = rel_err(cuda_fn(), torch_fn(), floor=1e-30)  # an all-zero reference: 0 or huge, not NaN
    cuda_ms, torch_ms = median_ms(cuda_fn, 2, repeats), median_ms(torch_fn, 2, repeats)
    result = {"op": op, "shape": shape, "dtype": dtype, "cuda_ms": cuda_ms, "torch_ms": torch_ms,
              "speedup": torch_ms / cuda_ms, "rel_err": err}
    print(f"{op:16s} {shape:28s} {dtype:6s} cuda {cuda_ms:8.3f} ms  torch {torch_ms:8.3f} ms  ×{result['speedup']:.2f}  err {err:.1e}")
    return result


def gram_rows(cuda, reference, repeats: int) -> list[dict]:
    rows = []
    for b, s, n_in, n_out in GRAM_SHAPES:
        for dtype, tf32 in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]:
            A = torch.randn(b, n_in, device="cuda").to(dtype)
            G = torch.randn(b, s, n_out, device="cuda").to(dtype)
            K = torch.zeros(b * s, b * s, device="cuda")

            def run(backend):
                def call():
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    K.zero_()
                    backend.gram_dense(K, A, G, True)
                    return K.clone()
                return call

            name = "tf32" if tf32 else str(dtype).removeprefix("torch.")
            rows.append(row("gram_dense", f"b={b} s={s} in={n_in} out={n_out}", name, run(cuda), run(reference), repeats))
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def backproject_rows(cuda, reference, repeats: int) -> list[dict]:
    rows = []
    for b, s, T, n_in, n_out in BACKPROJECT_SHAPES:
        for dtype in [torch.float32, torch.bfloat16]:
            A = torch.randn(b, T, n_in, device="cuda").to(dtype)
            G = torch.randn(b, s, T, n_out, device="cuda").to(dtype)
            u = torch.randn(b, s, device="cuda")
            rows.append(row("backproject", f"b={b} s={s} T={T} in={n_in} out={n_out}", str(dtype).removeprefix("torch."),
                            lambda: cuda.backproject(A, G, u, True)[0], lambda: reference.backproject(A, G, u, True)[0],
                            repeats))
    return rows


def solver_rows(cuda, reference, sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for m in sizes:
        for dtype in [torch.float32, torch.float64]:
            X = torch.randn(m, m, device="cuda", dtype=dtype)
            A = X @ X.T / m + torch.eye(m, device="cuda", dtype=dtype)
            B = torch.randn(m, 1, device="cuda", dtype=dtype)
            name = str(dtype).removeprefix("torch.")
            rows.append(row("cholesky_solve", f"m={m}", name, lambda: cuda.cholesky_solve(A, B)[0],
                            lambda: reference.cholesky_solve(A, B)[0], repeats))
            if m <= 2048:
                rows.append(row("eigh", f"m={m}", name, lambda: cuda.eigh(A)[0], lambda: reference.eigh(A)[0], repeats))
    for dtype in [torch.float32, torch.float64]:
        X = torch.randn(4096, 10, 10, device="cuda", dtype=dtype)
        Q = X @ X.mT + 0.1 * torch.eye(10, device="cuda", dtype=dtype)
        rows.append(row("cholesky_batched", "batch=4096 n=10", str(dtype).removeprefix("torch."),
                        lambda: cuda.cholesky_batched(Q)[0], lambda: reference.cholesky_batched(Q)[0], repeats))
    return rows


def write_solver_auto_table(rows: list[dict], gpu: str, path: Path) -> dict:
    """Set the CUDA entry of each solver op in auto_table.json: "cuda" if its median speed-up over
    torch across the measured sizes and dtypes is ≥ AUTO_MIN_SPEEDUP, else "torch"."""
    table = json.loads(path.read_text())
    choices = table["devices"].setdefault("cuda", {})
    speedups = []
    for op in SOLVER_OPS:
        x = statistics.median(r["speedup"] for r in rows if r["op"] == op)
        choices[op] = "cuda" if x >= AUTO_MIN_SPEEDUP else "torch"
        speedups.append(f"{op}/cuda {x:.2f}×")
    table["solver_note"] = f"cuda solver choices from benchmarks/kernels_cuda.py on {gpu}: " + ", ".join(speedups)
    path.write_text(json.dumps(table, indent=2) + "\n")
    return table


def markdown(report: dict) -> str:
    lines = [f"# Kernel benchmark: cuda backend vs torch backend on {report['gpu']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}; median of {report['repeats']} calls; "
             "speedup = torch ms / cuda ms, measured side by side.", "",
             "| op | shape | dtype | cuda ms | torch ms | speedup | rel err |", "|---|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['cuda_ms']:.3f} | {r['torch_ms']:.3f} | "
                     f"{r['speedup']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_cuda.py needs a CUDA GPU (none found); nothing measured")
    from egn_fast.ops import get_backend

    device = torch.device("cuda")
    cuda, reference = get_backend("cuda", device), get_backend("torch", device)
    repeats = 3 if args.quick else args.repeats
    sizes = [m for m in SOLVE_SIZES if m <= 1024] if args.quick else SOLVE_SIZES
    rows = gram_rows(cuda, reference, repeats) + backproject_rows(cuda, reference, repeats)
    rows += solver_rows(cuda, reference, sizes, repeats)
    gpu = torch.cuda.get_device_name(device)
    report = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "repeats": repeats, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_cuda_{gpu_slug(gpu)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    if args.write_auto_table:
        from egn_fast.ops import AUTO_TABLE_PATH

        print("auto table:", json.dumps(write_solver_auto_table(rows, gpu, AUTO_TABLE_PATH)["devices"]["cuda"]))


if __name__ == "__main__":
    main()
