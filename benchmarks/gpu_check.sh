#!/usr/bin/env bash
# moekit's GPU checks in one prepared run, for a CUDA machine with torch and triton
# already installed (no pip install: the source tree is used through PYTHONPATH).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# 0. benchmarks/bench_triton_bwd.py: the six kernels of a step, one by one, with the
#    BASE tiles and with BASE + WIDE, against torch._grouped_mm on the same GEMMs, each
#    output checked against grouped_mm + torch ops (about 1.5 minutes).
# 2. tests/test_triton_gpu.py: the compiled Triton kernels against the fp64 oracle
#    (fp32, fp16, bf16), routing against the router, no host sync in a training
#    step, a CUDA-graph training step (16 pytest workers: most of the time is
#    Triton compiling and autotuning, which runs on the CPU; 192 s on an H200
#    machine with 16 cores, 2026-12-04; at the limit pytest is interrupted with
#    SIGINT, so it still prints the failures it has).
# 1. benchmarks/bench_triton.py in bf16: the fused kernels against grouped_mm and
#    a dense FFN of the same active FLOPs, timings interleaved (GPU idle: nothing
#    else runs during it), then benchmarks/bench_triton_routing.py (routing eager
#    and replayed from a CUDA graph).
# About 7 minutes in all, plus the machine's start. Logs and the benchmarks' JSON go to
# $OUT. Each step has a time limit (BWD_LIMIT, TEST_LIMIT, BENCH_LIMIT, ROUTING_LIMIT in
# seconds; 0 skips the step).
set -u
OUT=${OUT:-/tmp/moekit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
t0=$(date +%s)
# without a GPU every step below would only print its own "skipped" line (or, for
# nvidia-smi and the device query, a traceback): say so once and stop instead
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False here); nothing run"
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

if [ "${BWD_LIMIT:-200}" != 0 ]; then
timeout "${BWD_LIMIT:-200}" python3 benchmarks/bench_triton_bwd.py --reps 20 \
    --json "$OUT/bench_triton_bwd.json" 2>&1 | tee "$OUT/bwd.log"
echo "bwd: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
fi

if [ "${BENCH_LIMIT:-300}" != 0 ]; then
timeout "${BENCH_LIMIT:-300}" python3 benchmarks/bench_triton.py --dtype bf16 --reps 20 \
    --json "$OUT/bench_triton_bf16.json" 2>&1 | tee "$OUT/bench.log"
echo "bench: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
fi

if [ "${TEST_LIMIT:-300}" != 0 ]; then
timeout -s INT "${TEST_LIMIT:-300}" python3 -m pytest -p no:cacheprovider -p no:benchmark -q \
    -n "${WORKERS:-16}" --timeout=200 -rfE --tb=short --durations=8 tests/test_triton_gpu.py \
    2>&1 | tee "$OUT/tests.log"
echo "tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
fi

if [ "${ROUTING_LIMIT:-90}" != 0 ]; then
timeout "${ROUTING_LIMIT:-90}" python3 benchmarks/bench_triton_routing.py 2>&1 | tee "$OUT/routing.log"
echo "routing: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
fi
