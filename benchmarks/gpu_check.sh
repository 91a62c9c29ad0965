#!/usr/bin/env bash
# `make gpu-check`, on a machine with a CUDA GPU (no package registry needed): install the package
# (which builds its CUDA extension where setup.py has one), run the GPU tests, benchmark the
# kernels, and print the summary table last. Aimed at under 8 minutes on an H100.
# Results: benchmarks/results/kernels_<gpu>_quick.{json,md}, kernels_cuda_<gpu>*.{json,md} and logs, copied to
# $OUT when it is set. GPU_CHECK_FULL=1 benchmarks the full shape grid instead (longer).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
start=$(mktemp)  # files newer than this were written by this run
trap 'rm -f "$start"' EXIT

"$PYTHON" -c 'import torch, sys; torch.cuda.is_available() or sys.exit("gpu-check needs a CUDA GPU")'
"$PYTHON" -c 'import torch, triton; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)'

echo "== build (pip install -e ., no network)"
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .

echo "== GPU tests"
# One block-size config per kernel here (the benchmark below autotunes and checks its results).
tests=(tests/test_triton.py tests/test_auto_backend.py tests/test_kernel_benchmark.py)
tests+=($(ls tests/test_cuda*.py 2>/dev/null || true))
set +e
EGN_FAST_TRITON_AUTOTUNE=0 timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$RESULTS/gpu_check_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

echo "== kernel benchmark"
if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then bench_args=(); else bench_args=(--quick); fi
set +e
timeout 240 "$PYTHON" benchmarks/kernels.py "${bench_args[@]}" --out "$RESULTS" > "$RESULTS/gpu_check_bench.log" 2>&1
bench_rc=$?
tail -n 5 "$RESULTS/gpu_check_bench.log"
echo "== CUDA extension benchmark (cuSOLVER vs torch.linalg, cuda kernels vs torch)"
timeout 120 "$PYTHON" benchmarks/kernels_cuda.py "${bench_args[@]}" --out "$RESULTS" > "$RESULTS/gpu_check_bench_cuda.log" 2>&1
cuda_rc=$?
set -e
tail -n 5 "$RESULTS/gpu_check_bench_cuda.log"

if [ -n "${OUT:-}" ]; then
    find "$RESULTS" -maxdepth 1 -type f -newer "$start" -exec cp {} "$OUT"/ \;
fi
echo "== summary: tests exit $tests_rc, kernel benchmark exit $bench_rc, cuda benchmark exit $cuda_rc"
tables=$(find "$RESULTS" -maxdepth 1 -name 'kernels_*.md' -newer "$start" | sort)
if [ -n "$tables" ]; then cat $tables; else echo "no benchmark table was written"; fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$cuda_rc" = 0 ]
