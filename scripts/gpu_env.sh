# Sourced by the scripts/gpu_*.sh stages: run from the repository root, results under $OUT
# (default ./out), lanner from the tree, the UTC day for the results' names.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=.
day=$(date -u +%F)
# gpu_tests NAME... : tests/gpu/test_NAME_gpu.py, one pytest process a file (the engines of several
# files in one process run out of GPU memory), counts shown (-o addopts="": the project's -q plus
# another hides pytest's summary line)
gpu_tests() {
  for f in "$@"; do
    echo "tests/gpu/test_${f}_gpu.py:"
    python3 -m pytest -o addopts="" -q -p no:cacheprovider -p no:warnings "tests/gpu/test_${f}_gpu.py" 2>&1 | tail -8
  done
}
