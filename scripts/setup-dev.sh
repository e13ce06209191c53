#!/usr/bin/env bash
# Create .venv with the pinned CPU development environment and install gptfast into it
# (building the C++ sampling extension). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-build-isolation --no-deps -e .
