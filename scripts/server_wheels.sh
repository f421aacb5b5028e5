#!/usr/bin/env bash
# Download the server's pure-Python dependencies (and pydantic-core) and structured outputs' xgrammar
# as wheels for the GPU machine, which has torch, transformers and numpy but no network, FastAPI or xgrammar.
# Usage: bash scripts/server_wheels.sh   # -> .wheels/ (git-ignored; pass it in the device tool's `carry`)
# There:  pip install --no-index --find-links .wheels fastapi uvicorn prometheus_client httpx aiohttp && pip install --no-deps -e .
#         pip install --no-index --find-links .wheels --no-deps xgrammar apache-tvm-ffi pydantic pydantic-core \
#             annotated-types typing-inspection typing-extensions jsonschema \
#             jsonschema-specifications referencing rpds-py attrs   # structured outputs and their tests
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q -d .wheels --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version "${PYTHON_VERSION:-3.12}" fastapi uvicorn prometheus_client httpx
# lanner bench serve's client, and its compiled dependencies (multidict, yarl, frozenlist, propcache)
python3 -m pip download -q -d .wheels --only-binary=:all: --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --python-version "${PYTHON_VERSION:-3.12}" aiohttp
python3 -m pip download -q -d .wheels --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --no-deps \
  --python-version "${PYTHON_VERSION:-3.12}" xgrammar apache-tvm-ffi jsonschema jsonschema-specifications \
  referencing rpds-py attrs
# py-spy, to profile `lanner serve` there (scripts/serve_profile.sh)
python3 -m pip download -q -d .wheels --only-binary=:all: --platform manylinux_2_5_x86_64 --no-deps \
  --python-version "${PYTHON_VERSION:-3.12}" py-spy
du -sh .wheels
