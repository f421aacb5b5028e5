#!/usr/bin/env bash
# The HTTP side's CPU cost per streamed token (issue [12]): `lanner serve` on the CPU with the embedded
# model (the engine in its child process, not counted), a burst of streaming requests from
# `lanner bench serve`, and the server process's own CPU time (user + system, /proc) over the burst.
#   bash scripts/server_cpu_cost.sh [NUM_PROMPTS] [OUTPUT_LEN] [PORT]
set -euo pipefail
n=${1:-64} len=${2:-256} port=${3:-8017}
source "$(dirname "$0")/serve_lib.sh"
trap 'kill ${server_pid:-} 2>/dev/null; wait ${server_pid:-} 2>/dev/null || true' EXIT
start_server . "$port" /tmp/server_cpu_cost.log --device cpu --max-num-seqs "$n"
cpu() { awk '{print $14 + $15}' "/proc/$server_pid/stat"; }  # clock ticks, this process only (not the engine child)
burst() { python3 -m lanner.cli bench serve --base-url "http://127.0.0.1:$port" --num-prompts "$n" --input-len 32 \
  --output-len "$len" --request-rate inf --seed "$1" --client-processes 1 2>/dev/null | grep -o '"output_tok_per_s": [0-9.]*' | head -1; }
burst 0 > /dev/null  # warm-up
before=$(cpu)
echo "burst: $(burst 1)"
after=$(cpu)
python3 -c "import os,sys; t=(int(sys.argv[2])-int(sys.argv[1]))/os.sysconf('SC_CLK_TCK'); n=int(sys.argv[3]); print(f'server process CPU {t:.2f} s for {n} streamed tokens: {t/n*1e6:.0f} us a token')" "$before" "$after" "$((n * len))"
