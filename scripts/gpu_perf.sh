#!/usr/bin/env bash
# Issue [12]'s GPU runs (results under $OUT, default ./out):
#   bash scripts/gpu_perf.sh tests      # tests/gpu engine, piecewise, kernels, gemv, structured, speculative, server (wheels first)
#   bash scripts/gpu_perf.sh serve      # serve burst vs offline, Qwen3-8B shape, _base/ and this tree (the
#                                       # previous commit: mkdir _base && git archive HEAD lanner | tar -x -C _base)
#   bash scripts/gpu_perf.sh breakdown  # W-8B and W-nano: throughput, then where the time goes
#   bash scripts/gpu_perf.sh steps      # lanner bench step, Qwen3-0.6B and Qwen3-8B shapes, _base/ and this tree
#   bash scripts/gpu_perf.sh latency    # lanner bench latency at batch 1, the same models and trees
#   bash scripts/gpu_perf.sh hostphases # scripts/host_phases.py (this tree's script) over _base/'s lanner and this one
#   bash scripts/gpu_perf.sh kv         # W-8B and W-nano with the KV cache in bf16 and in fp8 (--kv-cache-dtype)
#   bash scripts/gpu_perf.sh sampled    # scripts/sampled_throughput.py (W-8B greedy, Qwen3/Llama 3/Qwen2.5 sampling,
#                                       # logprobs) over _base/'s lanner and this one
#   bash scripts/gpu_perf.sh topp       # top-p's threshold search: its GPU tests, scripts/top_p_probe.py, and the
#                                       # sampled presets greedy/llama3/qwen3 over _base/'s lanner and this one
#   bash scripts/gpu_perf.sh norms      # scripts/rms_norm_probe.py (the add + RMSNorm kernel's warps), then W-8B over
#                                       # _base/'s lanner and this one
#   bash scripts/gpu_perf.sh gemv       # tests/gpu/test_gemv_gpu.py, then batch 1 and 8 with --gemv-kernels cublas
#                                       # and auto in one call (a fresh cache folder: auto measures its table)
#   bash scripts/gpu_perf.sh unmeasured # the twelfth session's fused GEMVs (silu * up, add + RMSNorm) in one
#                                       # ~8-minute call: tests/gpu gemv and speculative, then batch 1 of both
#                                       # models over _base/ (54edb54: before them) and this tree
#   bash scripts/gpu_perf.sh pdl        # the thirteenth session's work in one ~7-minute call: batch 1 of both
#                                       # models with and without --dependent-launch and over _base/ (6ddf7d1:
#                                       # before it), its GPU tests (the engine with and without dependent launch,
#                                       # normed GEMV, decode splits), the 512-token step of Qwen3-0.6B both ways
#   bash scripts/gpu_perf.sh prefetch   # benchmarks/experiments/l2-prefetch.patch against this tree on one GEMV
#                                       # table: its GPU tests, batch 1 of Qwen3-8B 7 times (the last on a second
#                                       # table measured from scratch; both tables saved), ~8 minutes
#   bash scripts/gpu_perf.sh splits     # decode attention at batch 1, the split rule against a split per 64-256
#                                       # keys (decode_probe.py); then, with _base/, batch 1 of both models and
#                                       # the decode kernels' GPU tests
#   bash scripts/gpu_perf.sh prefill-split  # benchmarks/experiments/prefill-split.patch: its GPU test, then the
#                                           # prefill probe's shapes, default tile against split keys
#   bash scripts/gpu_perf.sh pdl-throughput  # W-8B and W-nano with and without --dependent-launch
#   bash scripts/gpu_perf.sh advance    # decode steps advanced on the device (~5 minutes): their GPU tests, then
#                                       # batch 1 of both models over _base/ (SPLIT=1: and _split/) and this tree
#                                       # on one GEMV table (REPEAT=1: this tree again); HOSTPHASES=1 instead:
#                                       # scripts/host_phases.py over _split/ and this tree
#   bash scripts/gpu_perf.sh gemv-wide  # gemv_probe.py's wider one-row grid (KINDS=1, STAGES "3 4") on Qwen3-8B's
#                                       # q/k/v and o projections, then its batch 1 with the engine's candidates
#                                       # and with the probe's winners added (gemv_extra_candidates.py), ~7 minutes
#   bash scripts/gpu_perf.sh v-by-key   # benchmarks/experiments/fp8-v-by-key.patch (fp8 V laid out by key):
#                                       # its GPU kernel tests, decode/prefill probes and W-8B over both trees
#   bash scripts/gpu_perf.sh ncu-v-by-key # Nsight Compute over one prefill-attention launch (32 heads, 2,048
#                                         # tokens, fp8) in this tree and with fp8-v-by-key.patch
#   CFGS=qwen3-8b|qwen3-0.6b bash scripts/gpu_perf.sh closing  # the issue's rows of one model, _base/ (the tree
#                                       # before the issue: 20e231c) beside this one: batch 1, W-8B or W-nano (this
#                                       # tree with the fp8 cache too), then the 8B's serving burst (8 client
#                                       # processes; .wheels carried) or the 0.6B's 512-token step (~8 minutes)
#   bash scripts/gpu_perf.sh draft-pool # benchmarks/experiments/draft-graphs-shared-pool.patch: the speculative GPU
#                                       # tests and the draft compile case over a patched copy (~3 minutes)
#   bash scripts/gpu_perf.sh ncu-decode # Nsight Compute over one decode-attention launch at W-8B's batch 256, fp8
#                                       # and bf16 caches (decode_probe.py SHAPES=w8b-b256)
source "$(dirname "$0")/gpu_env.sh"
root=$(pwd); outdir=$(cd "$out" && pwd)
# tree_runs DEFAULT_CFG...: a "TREE TAG CFG" line for _base/ (tag base, when present), then this tree
# (new), each with every config of $CFGS (default: the arguments); $TREES overrides the trees. The
# stages read them on descriptor 3, leaving stdin alone.
tree_runs() {
  for tree in ${TREES:-_base .}; do
    [ -d "$tree/lanner" ] || continue
    for cfg in ${CFGS:-$*}; do echo "$tree $([ "$tree" = . ] && echo new || echo base) $cfg"; done
  done
}
# gpu_tests_k FILE EXPRESSION: the tests of tests/gpu/test_FILE_gpu.py that -k EXPRESSION selects
gpu_tests_k() {
  timeout 150 python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings "tests/gpu/test_${1}_gpu.py" \
    -k "$2" 2>&1 | tail -4 | tee -a "$outdir/gpu-tests-${1}.txt"
}
# batch1 CFG TREE TAG [FLAG...]: lanner bench latency at batch 1 (128 -> 256 tokens) of TREE's lanner
batch1() {
  [ -d "$2/lanner" ] || return 0
  echo "== latency $3 $1"
  (cd "$2" && timeout 90 python3 -m lanner.cli bench latency --config "$root/benchmarks/configs/$1.json" \
    --batch-sizes 1 --input-len 128 --output-len 256 --gpu-memory-utilization 0.5 "${@:4}" \
    --output-json "$outdir/$day-latency-$1-$3.json") 2>&1 | grep -E "^\{'batch|Error"
}
# patched_copy NAME: _patched/, this tree's lanner, tests and scripts with benchmarks/experiments/NAME.patch
patched_copy() {
  rm -rf _patched && mkdir _patched && cp -r lanner tests scripts pyproject.toml _patched/ &&
    (cd _patched && { patch -p1 -s < "$root/benchmarks/experiments/$1.patch" ||
                      git apply "$root/benchmarks/experiments/$1.patch"; })
}
# by_key_tag TREE: main for this tree, by-key for _patched/ (the fp8-v-by-key stages' result names)
by_key_tag() { [ "$1" = . ] && echo main || echo by-key; }
case "${1:-}" in
  tests)
    bash scripts/gpu_structured.sh wheels
    python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn prometheus_client httpx 2>&1 | tail -3
    gpu_tests engine piecewise kernels gemv structured speculative server | tee "$out/gpu-tests-perf.txt" ;;
  serve)
    while read -r tree tag cfg <&3; do
      echo "== $tag"
      TREE=$tree TAG=$tag NO_PROFILE=$([ "$tag" = base ] && echo 1) \
        bash scripts/serve_profile.sh "$out" "benchmarks/configs/$cfg.json" 400 256 128
    done 3< <(tree_runs qwen3-8b) ;;
  breakdown)
    python3 -m lanner.cli bench throughput --config benchmarks/configs/qwen3-8b.json --breakdown \
      --output-json "$out/$day-w8b-breakdown.json" 2>&1 | tail -1
    python3 -m lanner.cli bench throughput --workload W-nano --config benchmarks/configs/qwen3-0.6b.json --breakdown \
      --output-json "$out/$day-wnano-breakdown.json" 2>&1 | tail -1
    for f in "$out/$day"-w*-breakdown.json; do
      python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print(sys.argv[1], r['output_tok_per_s'], json.dumps(r['breakdown']))" "$f"
    done ;;
  kv)
    for dtype in ${KV_DTYPES:-auto fp8}; do
      for run in "W-8B qwen3-8b w8b" "W-nano qwen3-0.6b wnano"; do
        set -- $run
        python3 -m lanner.cli bench throughput --workload "$1" --config "benchmarks/configs/$2.json" \
          --kv-cache-dtype "$dtype" ${BREAKDOWN:+--breakdown} --output-json "$out/$day-$3-kv-$dtype.json" 2>&1 | tail -1
      done
    done ;;
  gemv)
    export LANNER_CACHE_DIR=$(mktemp -d)
    gpu_tests gemv | tee "$out/gpu-tests-gemv.txt"
    for cfg in ${CFGS:-qwen3-0.6b qwen3-8b}; do
      for kernels in cublas auto; do
        python3 -m lanner.cli bench latency --config "benchmarks/configs/$cfg.json" --batch-sizes 1 8 --input-len 128 \
          --output-len 256 --gpu-memory-utilization 0.5 --gemv-kernels $kernels \
          --output-json "$out/$day-latency-$cfg-gemv-$kernels.json" 2>&1 | grep -E "^\{'batch|Error"
      done
    done ;;
  steps|latency)
    # lanner bench step (prefill and mixed steps) or latency (batch-1 decode) of _base/ and this tree
    args=(--token-counts ${TOKENS:-64 512 2048} --no-overlap-scheduling)
    [ "$1" = latency ] && args=(--batch-sizes 1 --input-len 128 --output-len 256)
    while read -r tree tag cfg <&3; do
      echo "== $1 $tag $cfg"
      (cd "$tree" && python3 -m lanner.cli bench "${1%s}" --config "$root/benchmarks/configs/$cfg.json" "${args[@]}" \
        --gpu-memory-utilization 0.5 --output-json "$outdir/$day-$1-$cfg-$tag.json") 2>&1 | grep -E "^\{|capture|Error|tok/s"
    done 3< <(tree_runs qwen3-0.6b qwen3-8b) ;;
  hostphases)
    # PYTHONPATH=. is relative: from inside a tree the script imports that tree's lanner
    while read -r tree tag cfg <&3; do
      echo "== host phases $tag $cfg"
      (cd "$tree" && python3 "$root/scripts/host_phases.py" --config "$root/benchmarks/configs/$cfg.json") \
        > "$outdir/$day-host-phases-$cfg-$tag.txt" 2>&1
      tail -30 "$outdir/$day-host-phases-$cfg-$tag.txt" | grep -E '"(schedule|prepare|prepare.stage|plan|sample|step)"'
    done 3< <(tree_runs qwen3-0.6b) ;;
  topp)
    python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings tests/gpu/test_kernels_gpu.py -k top_p \
      2>&1 | tail -3 | tee "$out/gpu-tests-top-p.txt"
    python3 scripts/top_p_probe.py 2>&1 | tee "$out/$day-top-p-probe.txt"
    PRESETS="greedy llama3 qwen3" bash "$0" sampled ;;
  sampled)
    while read -r tree tag cfg <&3; do
      echo "== sampled $tag $cfg"
      (cd "$tree" && python3 "$root/scripts/sampled_throughput.py" --config "$root/benchmarks/configs/$cfg.json" \
        ${PRESETS:+--presets $PRESETS}) 2>&1 | tee "$outdir/$day-sampled-$cfg-$tag.txt" | grep -E '^\{|Error'
    done 3< <(tree_runs qwen3-8b) ;;
  norms)
    python3 scripts/rms_norm_probe.py 2>&1 | tee "$out/$day-rms-norm-probe.txt"
    while read -r tree tag cfg <&3; do
      echo "== W-8B $tag"
      (cd "$tree" && python3 -m lanner.cli bench throughput --config "$root/benchmarks/configs/$cfg.json" \
        --output-json "$outdir/$day-w8b-$tag.json") 2>&1 | grep -o '"output_tok_per_s": [0-9.]*' | head -1
    done 3< <(tree_runs qwen3-8b) ;;
  unmeasured)
    export LANNER_CACHE_DIR=$(mktemp -d)  # each tree measures its GEMV table (the kernel's source is in the key)
    gpu_tests gemv speculative | tee "$out/gpu-tests-gemv-speculative.txt"
    bash "$0" latency ;;
  pdl)
    # the engine's outputs with and without dependent launch first (a hang shows here), then the
    # timings, then the kernels' tests, then the step
    export LANNER_CACHE_DIR=$(mktemp -d)
    gpu_tests_k engine dependent
    for cfg in qwen3-0.6b qwen3-8b; do
      for run in ". pdl --dependent-launch" ". no-pdl --no-dependent-launch" "_base base"; do
        batch1 $cfg $run
      done
    done
    gpu_tests_k gemv "normed or dependent"
    gpu_tests_k kernels decode
    for flag in --no-dependent-launch --dependent-launch; do
      echo "== step qwen3-0.6b $flag"
      timeout 90 python3 -m lanner.cli bench step --config benchmarks/configs/qwen3-0.6b.json --token-counts 512 \
        --no-overlap-scheduling --gpu-memory-utilization 0.5 $flag --output-json "$out/$day-step-0.6b$flag.json" \
        2>&1 | grep -E "^\{|Error"
    done ;;
  prefetch)
    # benchmarks/experiments/l2-prefetch.patch over a copy of this tree (_patched/): its GPU tests,
    # then batch 1 of Qwen3-8B on this tree's GEMV table (copied to the patched tree's key: the same
    # choices) four ways, between two runs of this tree; last, this tree on a table measured again
    # from scratch (both tables saved: is the table's choice noise or the machine?). ~8 minutes
    patched_copy l2-prefetch || exit 1
    (cd _patched && gpu_tests_k gemv "normed or dependent" && gpu_tests_k engine dependent)
    mine=$(mktemp -d); theirs=$(mktemp -d); again=$(mktemp -d)
    LANNER_CACHE_DIR=$mine batch1 qwen3-8b . main
    (cd _patched && python3 - "$mine/gemv_tables.json" "$theirs/gemv_tables.json" <<'PY'
import json, sys
import torch
from lanner.executor.gemv_table import table_key
from lanner.kernels import set_dependent_launch
from lanner.kernels.pdl import supported
set_dependent_launch(supported(torch.device("cuda")))  # as the engine's default
(key, entries), = json.load(open(sys.argv[1])).items()
json.dump({table_key(torch.device("cuda")): entries}, open(sys.argv[2], "w"))
print("the table of", key, "copied to", table_key(torch.device("cuda")))
PY
    ) || exit 1
    patched() {  # GEMV_BYTES KV_ROWS TAG
      LANNER_CACHE_DIR=$theirs LANNER_EXP_PREFETCH=$1 LANNER_EXP_KV_ROWS=$2 batch1 qwen3-8b _patched "$3"
    }
    patched 32768 8 gemv32k-kv; patched 0 0 off; patched 8192 8 gemv8k-kv; patched 0 8 kv
    LANNER_CACHE_DIR=$mine batch1 qwen3-8b . main-2
    LANNER_CACHE_DIR=$again batch1 qwen3-8b . main-fresh-table
    cp "$mine/gemv_tables.json" "$outdir/$day-gemv-table-main.json"
    cp "$again/gemv_tables.json" "$outdir/$day-gemv-table-main-again.json"
    python3 - "$outdir" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*-latency-qwen3-8b-*.json")):
    result = json.load(open(path))["results"]
    print(path.rsplit("/", 1)[-1], result["sweep"][0]["tok_per_s_per_seq"], "tok/s,",
          result["gemv"]["measured"], "GEMV shapes measured (0: the copied table)")
PY
    ;;
  prefill-split)
    # benchmarks/experiments/prefill-split.patch: its kernel against the torch reference on the GPU,
    # then prefill_probe.py's shapes with the default tile and the split-key kernel's tiles
    patched_copy prefill-split || exit 1
    (cd _patched && timeout 200 python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings \
      tests/test_prefill_split.py 2>&1 | tail -3 | tee "$outdir/gpu-tests-prefill-split.txt" &&
      DEFAULT_ONLY=1 SPLIT="128 256" timeout 300 python3 scripts/prefill_probe.py \
        "$outdir/$day-prefill-split-probe.json" 2>&1 | grep -v Warning) ;;
  v-by-key)
    # benchmarks/experiments/fp8-v-by-key.patch (an fp8 V cache laid out with a page's keys contiguous):
    # its kernel GPU tests, decode and prefill attention over fp8 in both trees, then W-8B with the fp8
    # cache in both trees (~6 minutes)
    patched_copy fp8-v-by-key || exit 1
    (cd _patched && timeout 200 python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings \
      tests/gpu/test_kernels_gpu.py -k "decode or prefill or fp8 or store or norm_rope" 2>&1 | tail -2 |
      tee "$outdir/gpu-tests-v-by-key.txt")
    for tree in . _patched; do
      echo "== $tree"
      (cd $tree && KV_DTYPE=fp8 SHAPES="w8b-b256 wnano-b256 b64-2k b16-8k" TILES="64,2,3" timeout 120 \
        python3 scripts/decode_probe.py "$outdir/$day-decode-probe-fp8-$(by_key_tag $tree).json" 2>&1 | grep -v Warning
       KV_DTYPE=fp8 DEFAULT_ONLY=1 timeout 120 python3 scripts/prefill_probe.py \
        "$outdir/$day-prefill-probe-fp8-$(by_key_tag $tree).json" 2>&1 | grep -v Warning | tail -4)
    done
    for tree in . _patched; do
      (cd $tree && timeout 150 python3 -m lanner.cli bench throughput --workload W-8B \
        --config "$root/benchmarks/configs/qwen3-8b.json" --kv-cache-dtype fp8 \
        --output-json "$outdir/$day-w8b-kv-fp8-$(by_key_tag $tree).json" 2>&1 | tail -1)
    done ;;
  pdl-throughput)
    # W-8B and W-nano (bf16 cache) with and without dependent launch, alternated, in one call
    for run in "W-8B qwen3-8b w8b" "W-nano qwen3-0.6b wnano"; do
      set -- $run
      for flag in --dependent-launch --no-dependent-launch; do
        timeout 200 python3 -m lanner.cli bench throughput --workload "$1" --config "benchmarks/configs/$2.json" \
          $flag --output-json "$outdir/$day-$3$flag.json" 2>&1 | tail -1
      done
    done ;;
  splits)
    # decode attention at batch 1: the engine's rule (a split per 64 keys, one up to 128) against a
    # split per 64-256 keys of the sequence, 128-8k keys, bf16 and fp8
    for kv in bf16 fp8; do
      KV_DTYPE=$kv SPLIT_KEYS="64/128 64 128 256" timeout 200 python3 scripts/decode_probe.py \
        "$outdir/$day-decode-split-keys-$kv.json" 2>&1 | grep -v Warning
    done
    gpu_tests_k kernels decode
    export LANNER_CACHE_DIR=$(mktemp -d)  # one GEMV table for both trees (decode.py is not in its key)
    for cfg in qwen3-8b qwen3-0.6b; do
      for run in ". new" "_base base" ". new-2" "_base base-2"; do batch1 $cfg $run; done
    done ;;
  advance)
    # trees: _base/ (before the split rule and the advance), _split/ (the split rule), this tree
    if [ -n "${HOSTPHASES:-}" ]; then
      for tree in _split .; do
        echo "== host phases $tree"
        (cd "$tree" && python3 "$root/scripts/host_phases.py" --config "$root/benchmarks/configs/qwen3-0.6b.json") \
          > "$outdir/$day-host-phases-qwen3-0.6b-${tree//[^a-z]/}.txt" 2>&1
        grep -E '"(schedule|prepare|prepare.stage|plan|step|prepare \+ plan[^"]*)"' \
          "$outdir/$day-host-phases-qwen3-0.6b-${tree//[^a-z]/}.txt"
      done
      exit 0
    fi
    gpu_tests_k engine "advanced or no_host_sync"
    export LANNER_CACHE_DIR=$(mktemp -d)  # one GEMV table for every tree (decode.py is not in its key)
    for cfg in qwen3-8b qwen3-0.6b; do
      for run in ". new" ${SPLIT:+"_split split"} "_base base" ${REPEAT:+". new-2"}; do batch1 $cfg $run; done
    done ;;
  gemv-wide)
    KINDS=1 ROWS=1 STAGES="${STAGES:-3 4}" LAYERS="${LAYERS:-qkv o}" timeout 330 python3 scripts/gemv_probe.py \
      "$out/$day-gemv-probe-wide.json" benchmarks/configs/qwen3-8b.json 2>&1 | grep -v Warning
    for run in main extra; do
      export LANNER_CACHE_DIR=$(mktemp -d)  # a table measured afresh for each list
      echo "== latency qwen3-8b $run"
      timeout 150 python3 scripts/gemv_extra_candidates.py "$out/$day-gemv-probe-wide.json" $([ $run = main ] && echo 0) \
        -- bench latency --config benchmarks/configs/qwen3-8b.json --batch-sizes 1 --input-len 128 --output-len 256 \
        --gpu-memory-utilization 0.5 --output-json "$out/$day-latency-qwen3-8b-gemv-$run.json" 2>&1 |
        grep -E "^\{'batch|Error|extra"
      cp "$LANNER_CACHE_DIR/gemv_tables.json" "$out/$day-gemv-table-$run.json"
    done ;;
  ncu-decode)
    # one launch of decode attention at W-8B's batch 256 under Nsight Compute, over an fp8 and a bf16 cache
    # with the engine's tiles: what holds the fp8 kernel below the KV-read bound (Firecracker machines
    # read the counters; gVisor ones do not: docs of the device tool, KINDS.md)
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for kv in fp8 bf16; do
      KV_DTYPE=$kv SHAPES=w8b-b256 TILES="64,$([ $kv = fp8 ] && echo 2 || echo 4),3" timeout 240 "$ncu" \
        --clock-control none --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy \
        --section LaunchStats python3 scripts/decode_probe.py > "$out/$day-ncu-decode-$kv.txt" 2>&1
      grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Stall" \
        "$out/$day-ncu-decode-$kv.txt" | head -24
    done ;;
  ncu-v-by-key)
    # why benchmarks/experiments/fp8-v-by-key.patch slows prefill attention over long prompts (156 -> 224 us
    # at 32 heads x 2,048 tokens, nineteenth session): one launch of the prefill kernel at that shape, fp8,
    # under Nsight Compute in main and in the patched copy (shared-memory stores and bank conflicts, stalls)
    patched_copy fp8-v-by-key || exit 1
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for tree in . _patched; do
      tag=$(by_key_tag $tree)
      (cd $tree && KV_DTYPE=fp8 SHAPES=32h-p2048 DEFAULT_ONLY=1 timeout 240 "$ncu" --clock-control none \
        --kernel-name regex:_prefill_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats \
        --section InstructionStats --section Occupancy --section LaunchStats \
        python3 scripts/prefill_probe.py > "$outdir/$day-ncu-prefill-fp8-$tag.txt" 2>&1)
      echo "== $tag"
      grep -E "Duration|DRAM Throughput|Issue Slots Busy|Registers Per|Bank Conflicts|Stall (Long|Short|MIO|Barrier)" \
        "$outdir/$day-ncu-prefill-fp8-$tag.txt" | head -24
    done ;;
  draft-pool)
    patched_copy draft-graphs-shared-pool || exit 1
    (cd _patched && timeout 200 python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings \
      tests/gpu/test_speculative_gpu.py 2>&1 | tail -4 | tee "$outdir/gpu-tests-draft-pool-speculative.txt" &&
      timeout 120 python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings \
      tests/gpu/test_piecewise_gpu.py -k "compiles_no_kernel and draft" 2>&1 | tail -4 |
      tee "$outdir/gpu-tests-draft-pool-compiles.txt") ;;
  closing)
    cfg=${CFGS:-qwen3-8b}; workload=$([ "$cfg" = qwen3-8b ] && echo W-8B || echo W-nano)
    export LANNER_CACHE_DIR=$(mktemp -d)
    for run in "_base base" ". new"; do batch1 $cfg $run; done
    for run in "_base base auto" ". new auto" ". new fp8"; do
      set -- $run
      echo "== $workload $2 kv $3"
      (cd "$1" && timeout 200 python3 -m lanner.cli bench throughput --workload $workload \
        --config "$root/benchmarks/configs/$cfg.json" --kv-cache-dtype $3 \
        --output-json "$outdir/$day-$workload-$2-kv-$3.json") 2>&1 | grep -o '"output_tok_per_s": [0-9.]*' | head -1
    done
    if [ "$cfg" = qwen3-8b ]; then
      CLIENTS=8 NO_PROFILE=1 bash scripts/serve_profile.sh "$out" benchmarks/configs/qwen3-8b.json 400 256 128
    else
      TOKENS=512 CFGS=$cfg bash "$0" steps  # one synchronous step, both trees
      echo "== step new back to back"
      timeout 120 python3 -m lanner.cli bench step --config "benchmarks/configs/$cfg.json" --token-counts 512 \
        --gpu-memory-utilization 0.5 --output-json "$outdir/$day-steps-$cfg-new-back-to-back.json" 2>&1 | grep -E "^\{|Error"
    fi ;;
  *) echo "usage: $0 tests|serve|breakdown|steps|latency|hostphases|kv|gemv|sampled|topp|norms|unmeasured|pdl|prefetch|prefill-split|pdl-throughput|splits|advance|gemv-wide|ncu-decode|v-by-key|ncu-v-by-key|closing|draft-pool" >&2
     exit 2 ;;
esac
