#!/usr/bin/env bash
# Run the test suite under the newest versions of gptfast's development requirements, so
# that a release that breaks gptfast (as transformers 5.25 did by importing a distribution
# named `kernels`) shows up before the pins in requirements-dev.txt are moved to it.
#
#     bash scripts/check-latest.sh [pytest arguments]      # default: -q tests (the README's command)
#
# Builds a fresh virtual environment ($VENV, default ~/.cache/gptfast/venv-latest: outside
# the checkout, so it never travels with the working tree; removed and rebuilt on every
# run) with $PYTHON (default python3), installs every package named in
# requirements-dev.txt without its pin, at its newest version, except torch, which stays
# ==2.13.0 (the CPU wheel; unpinned it would pull a multi-GB CUDA build), and numpy, which
# stays below 2.4 (a known limit of the Triton interpreter the CPU tests run under, not of
# gptfast). Then installs gptfast in editable mode (building the C++ extension), prints the
# versions it got and runs pytest. Not part of CI (it depends on what was released today).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gptfast/venv-latest}
PYTHON=${PYTHON:-python3}
echo "check-latest: $("$PYTHON" --version 2>&1) ($PYTHON) -> $VENV (fresh)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# requirements-dev.txt's names, pins removed; torch and numpy keep the bounds above.
mapfile -t NAMES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' requirements-dev.txt | grep -v '^$' \
    | sed -E 's/[<>=!~;\[].*//' | grep -v -x -i -e torch -e numpy)
"${PIP[@]}" install -q --upgrade torch==2.13.0 "numpy<2.4" "${NAMES[@]}"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"${PIP[@]}" list --format=freeze 2>/dev/null | sed 's/^/check-latest: /'
if [ $# -eq 0 ]; then set -- -q tests; fi
"$VENV/bin/python" -m pytest "$@"
