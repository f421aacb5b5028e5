#!/usr/bin/env bash
# Issue [11]'s GPU checks (one device call each; the carried wheels must be installed first:
#   bash scripts/server_wheels.sh here, then carry .wheels and run `bash scripts/gpu_structured.sh wheels`):
#   bash scripts/gpu_structured.sh tests   # tests/gpu structured, speculative, engine, kernels (counts shown)
#   bash scripts/gpu_structured.sh bench   # lanner bench structured on the Qwen3-8B shape, batch 1 16 64
# Results go under $OUT (default ./out).
source "$(dirname "$0")/gpu_env.sh"
case "${1:-}" in
  wheels)
    python3 -m pip install -q --no-index --find-links .wheels --no-deps xgrammar apache-tvm-ffi pydantic \
      pydantic-core annotated-types typing-inspection typing-extensions jsonschema jsonschema-specifications \
      referencing rpds-py attrs 2>&1 | tail -3 ;;
  tests)
    gpu_tests structured speculative engine kernels | tee "$out/gpu-tests-structured.txt" ;;
  bench)
    python3 -m lanner.cli bench structured --config benchmarks/configs/qwen3-8b.json --train-tokenizer-vocab 151643 \
      --tokenizer-files 40000 --batch-sizes 1 16 64 --output-len 256 --schema-fields 4 64 --repeats 2 \
      --dtype bfloat16 --gpu-memory-utilization 0.85 --output-json "$out/$day-structured-8b.json" 2>&1 | tail -5 ;;
  *) echo "usage: $0 wheels|tests|bench" >&2; exit 2 ;;
esac
