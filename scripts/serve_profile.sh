#!/usr/bin/env bash
# Serving against offline under a burst (issue [12]), with profiles: the offline baseline of the
# same workload; then one `lanner serve`, sent the burst by `lanner bench serve` with 1, 4 and 8
# client processes (new prompts each time: no prefix-cache hits); then once more while py-spy samples
# the server and its engine child. Needs .wheels/ from scripts/server_wheels.sh (carry it).
#   [TAG=name] [TREE=dir] [NO_PROFILE=1] [SERVE_FLAGS=...] bash scripts/serve_profile.sh OUT_DIR CONFIG NUM_PROMPTS INPUT_LEN OUTPUT_LEN
# TREE: the lanner to measure (default: this one; a second tree for the previous commit's numbers: its
# commands run from inside it, as `python -m` puts the working directory before PYTHONPATH);
# NO_PROFILE=1 skips the py-spy burst; CLIENTS: the bursts' client process counts (default "1 4 8").
# Writes OUT_DIR/offline-NAME.json, serve-NAME-cN.json, serve-profile-NAME.{json,txt} (py-spy's collapsed
# stacks, one line per stack), serve-steps-NAME.txt (the engine's step totals and the latency histograms' sums after each burst) and the
# server's /metrics after the last burst.
set -uo pipefail
out=$(realpath "$1") config=$(realpath "$2") n=$3 input=$4 output=$5
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
source "$(dirname "$0")/serve_lib.sh"
name=$(basename "$config" .json)${TAG:+-$TAG}
measured() { (cd "${TREE:-.}" && exec python3 -m lanner.cli "$@"); }  # the client is always this tree's
measured bench throughput --config "$config" --num-prompts "$n" --input-range "$input" "$input" \
  --output-range "$output" "$output" --output-json "$out/offline-$name.json" 2>&1 | grep -o '"output_tok_per_s": [0-9.]*'
start_server "${TREE:-.}" 8000 "$out/serve-$name.log" --model "$config" --load-format dummy ${SERVE_FLAGS:-} || exit 1
burst() {  # burst SEED CLIENT_PROCESSES JSON
  python3 -m lanner.cli bench serve --base-url http://127.0.0.1:8000 --num-prompts "$n" --input-len "$input" \
    --output-len "$output" --request-rate inf --seed "$1" --client-processes "$2" --output-json "$3" 2>&1 \
    | grep -o '"output_tok_per_s": [0-9.]*\|"server": {[^}]*}' | head -2  # the server's split of the burst
  # the engine's step and token totals after each burst (differences: its steps, against offline's "steps")
  sleep 0.5  # the engine's stats after its last step reach the server
  # and the latency histograms' sums and counts (differences: the burst's mean handoff, queue, inference, e2e)
  curl -s 127.0.0.1:8000/metrics | grep -E "^lanner_engine_|^lanner_(e2e|time_to_first|request_)[a-z_]*_(sum|count)" \
    | sed "s|^|after $(basename "$3"): |" \
    >> "$out/serve-steps-$name.txt"
}
seed=1
for c in ${CLIENTS:-1 4 8}; do echo "client processes $c:"; burst $seed $c "$out/serve-$name-c$c.json"; seed=$((seed + 1)); done
if [ -z "${NO_PROFILE:-}" ]; then
  py-spy record --pid $server_pid --subprocesses --rate 250 --format raw --nonblocking --duration 20 \
    -o "$out/serve-profile-$name.txt" > "$out/py-spy-$name.log" 2>&1 &
  spy=$!
  sleep 1
  echo "profiled, client processes 8:"; burst $seed 8 "$out/serve-profile-$name.json"
  wait $spy; tail -1 "$out/py-spy-$name.log"
fi
curl -s localhost:8000/metrics | grep -E "^lanner_" > "$out/serve-metrics-$name.txt"
stop_server; echo "server exit code after SIGTERM: $?"
