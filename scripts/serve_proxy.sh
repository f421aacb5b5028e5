#!/usr/bin/env bash
# The serving burst on a CPU (issue [12], for sessions without a GPU): a 1-layer Qwen3 shape
# (benchmarks/configs/proxy-1layer.json, dummy weights) whose CPU steps take tens of ms, like a GPU's,
# offline and then served, the issue's 400 x 256 -> 128 burst from one aiohttp client process.
# Two cores shared by the engine, the server and the client inflate the served figures; compare
# trees within one run. Prints offline's wall time and steps, then each burst's duration and the
# server's split (lanner bench serve's `server`: engine steps, step_s, between_steps_s, latencies).
#   bash scripts/serve_proxy.sh [TREE...]   # default: this tree; others: folders holding a lanner/
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/serve_lib.sh
root=$(pwd) config=$root/benchmarks/configs/proxy-1layer.json
export OMP_NUM_THREADS=1  # one thread a process: the proxy's steps are small, and the cores are few
OMP_NUM_THREADS=1 python3 -m lanner.cli bench throughput --config "$config" --device cpu --num-prompts 400 \
  --input-range 256 256 --output-range 128 128 2>/dev/null | grep -o '"wall_s": [0-9.]*\|"steps": [0-9]*' | tr '\n' ' '
echo "(offline)"
seed=40
for tree in "${@:-.}"; do
  start_server "$tree" 8019 /tmp/serve_proxy.log --model "$config" --load-format dummy --device cpu \
    --disable-uvicorn-access-log || continue
  seed=$((seed + 1))
  echo "$tree: $(python3 -m lanner.cli bench serve --base-url http://127.0.0.1:8019 --num-prompts 400 --input-len 256 \
    --output-len 128 --request-rate inf --seed $seed --client-processes 1 2>/dev/null | head -1 \
    | grep -o '"duration_s": [0-9.]*\|"server": {[^}]*}' | tr '\n' ' ')"
  stop_server
done
