#!/usr/bin/env bash
# Issue [9]'s GPU checks, in stages that fit the device tool's 10-minute calls:
#   bash scripts/gpu_moe.sh tests    # tests/gpu: MoE kernels and the MoE engine
#   bash scripts/gpu_moe.sh kernel   # lanner bench moe: both executors vs the reference and the bounds
#   bash scripts/gpu_moe.sh tune     # scripts/tune_moe.py: tile tables for Qwen3-30B-A3B's experts
#   bash scripts/gpu_moe.sh model    # Qwen3-30B-A3B shape: batch-1 decode and the W-8B workload
# Results go under $OUT (default ./out).
source "$(dirname "$0")/gpu_env.sh"
case "${1:-}" in
  tests)
    gpu_tests moe_kernels moe | tee "$out/gpu-moe-tests.txt" ;;
  kernel)
    python3 -m lanner.cli bench moe --output-json "$out/$day-moe-kernel.json" 2>&1 | tail -60 ;;
  tune)
    python3 scripts/tune_moe.py 2>&1 | tail -40
    cp -r lanner/kernels/moe/configs "$out/moe-configs" ;;
  model)
    python3 -m lanner.cli bench latency --config benchmarks/configs/qwen3-30b-a3b.json --batch-sizes 1 \
      --input-len 128 --output-len 256 --dtype bfloat16 --no-piecewise-graphs \
      --output-json "$out/$day-qwen3-30b-a3b-bs1.json" 2>&1 | tail -4
    python3 -m lanner.cli bench throughput --config benchmarks/configs/qwen3-30b-a3b.json --workload W-8B \
      --dtype bfloat16 --output-json "$out/$day-qwen3-30b-a3b-w8b.json" 2>&1 | tail -4 ;;
  *) echo "usage: $0 tests|kernel|tune|model" >&2; exit 2 ;;
esac
