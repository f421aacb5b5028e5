# Sourced by the scripts/gpu_*.sh stages: run from the repository root, results under $OUT
# (default ./out), lanner from the tree, the UTC day for the results' names.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=.
day=$(date -u +%F)
