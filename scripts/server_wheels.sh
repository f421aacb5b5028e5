#!/usr/bin/env bash
# Download the server's pure-Python dependencies (and pydantic-core) as wheels for the GPU machine,
# which has torch, transformers and numpy but no network and no FastAPI/uvicorn.
# Usage: bash scripts/server_wheels.sh   # -> .wheels/ (git-ignored; pass it in the device tool's `carry`)
# There:  pip install --no-index --find-links .wheels fastapi uvicorn prometheus_client httpx && pip install --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q -d .wheels --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version "${PYTHON_VERSION:-3.12}" fastapi uvicorn prometheus_client httpx
du -sh .wheels
