#!/usr/bin/env bash
# The serving benchmark on the GPU machine: `lanner serve` (dummy weights of a config's shape) and
# `lanner bench serve` against it, then SIGTERM, whose exit code must be 0.
# Needs .wheels/ from scripts/server_wheels.sh (carry it).  Usage:
#   [SERVE_FLAGS="--no-engine-process"] [TAG=thread] bash scripts/serve_bench.sh OUT_DIR CONFIG [bench serve flags...]
set -uo pipefail
out=$1 config=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
source "$(dirname "$0")/serve_lib.sh"
name=$(basename "$config" .json)${TAG:+-$TAG}
start_server . 8000 "$out/serve-$name.log" --model "$config" --load-format dummy ${SERVE_FLAGS:-} || exit 1
python3 -m lanner.cli bench serve --base-url http://127.0.0.1:8000 "$@" \
  --output-json "$out/serve-$name.json" --plot "$out/serve-$name.png"
status=$?
curl -s localhost:8000/metrics | grep -E "^lanner_" > "$out/serve-$name-metrics.txt"
stop_server; echo "server exit code after SIGTERM: $?"
exit $status
