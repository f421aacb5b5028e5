#!/usr/bin/env bash
# Issue [8]'s GPU checks, in stages that fit the device tool's 10-minute calls:
#   bash scripts/gpu_speculative.sh tests   # tests/gpu (engine, piecewise, speculative)
#   bash scripts/gpu_speculative.sh 7b      # EAGLE-3 on the Qwen3-8B shape, replay mode
#   bash scripts/gpu_speculative.sh 7b-long # the same, k = 4, at 256 output tokens
#   bash scripts/gpu_speculative.sh 7b-512  # batch 1 at acceptance ~3.1 over 512 output tokens (the target's row)
#   bash scripts/gpu_speculative.sh 7a7c    # every proposer on lanner-tiny; n-gram on code edits
# Results go under $OUT (default ./out).
source "$(dirname "$0")/gpu_env.sh"
case "${1:-}" in
  tests)
    gpu_tests engine piecewise speculative | tee "$out/gpu-tests.txt" ;;
  7b)
    python3 -m lanner.cli bench speculative --replay 0.76 0.0 0.88 --k 4 4 6 --batch-sizes 1 4 16 64 \
      --output-len 64 --input-len 128 --dtype bfloat16 --gpu-memory-utilization 0.85 --max-num-seqs 64 \
      --max-model-len 2048 --output-json "$out/$day-spec-7b.json" 2>&1 | tail -5 ;;
  7b-long)  # the same at 256 output tokens: the adaptive policy's steady state
    python3 -m lanner.cli bench speculative --replay 0.76 0.0 --k 4 4 --batch-sizes 1 64 \
      --output-len 256 --input-len 128 --dtype bfloat16 --gpu-memory-utilization 0.85 --max-num-seqs 64 \
      --max-model-len 2048 --output-json "$out/$day-spec-7b-256.json" 2>&1 | tail -5 ;;
  7b-512)  # p = 0.76 and 0.78 bracket acceptance length 3.1 (measured, not set)
    python3 -m lanner.cli bench speculative --replay 0.76 0.78 --k 4 4 --batch-sizes 1 \
      --output-len 512 --input-len 128 --dtype bfloat16 --gpu-memory-utilization 0.85 --max-num-seqs 64 \
      --max-model-len 2048 --output-json "$out/$day-spec-7b-512.json" 2>&1 | tail -5 ;;
  7a7c)
    python3 -m lanner.cli bench speculative --dtype bfloat16 --gpu-memory-utilization 0.3 --max-num-seqs 16 \
      --max-num-batched-tokens 1024 --num-prompts 16 --output-len 128 --batch-sizes 1 16 \
      --output-json "$out/$day-spec-7a.json" 2>&1 | tail -3
    python3 -m lanner.cli bench speculative --workload edits --methods ngram --k 1 2 3 4 5 6 --batch-sizes 1 16 \
      --num-prompts 16 --input-len 256 --output-len 64 --dtype bfloat16 --gpu-memory-utilization 0.3 \
      --max-num-seqs 16 --output-json "$out/$day-spec-7c.json" 2>&1 | tail -3 ;;
  *) echo "usage: $0 tests|7b|7b-long|7b-512|7a7c" >&2; exit 2 ;;
esac
