#!/usr/bin/env bash
# The serving benchmark on the GPU machine: `lanner serve` (dummy weights of a config's shape) and
# `lanner bench serve` against it, then SIGTERM, whose exit code must be 0.
# Needs .wheels/ from scripts/server_wheels.sh (carry it).  Usage:
#   [SERVE_FLAGS="--no-engine-process"] [TAG=thread] bash scripts/serve_bench.sh OUT_DIR CONFIG [bench serve flags...]
set -uo pipefail
out=$1 config=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
name=$(basename "$config" .json)${TAG:+-$TAG}
python3 -m lanner.cli serve --model "$config" --load-format dummy --port 8000 ${SERVE_FLAGS:-} > "$out/serve-$name.log" 2>&1 &
pid=$!
for _ in $(seq 300); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
curl -sf localhost:8000/health > /dev/null || { echo "server did not start"; tail -30 "$out/serve-$name.log"; exit 1; }
python3 -m lanner.cli bench serve --base-url http://127.0.0.1:8000 "$@" \
  --output-json "$out/serve-$name.json" --plot "$out/serve-$name.png"
status=$?
curl -s localhost:8000/metrics | grep -E "^lanner_" > "$out/serve-$name-metrics.txt"
kill -TERM $pid; wait $pid; echo "server exit code after SIGTERM: $?"
exit $status
