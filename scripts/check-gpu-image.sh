#!/usr/bin/env bash
# Run the test suite under the GPU image's package versions, on any Linux machine (no GPU
# needed): the H200 machines run gptfast under their own python3 and packages, not the
# pins of requirements-dev.txt, so a torch API that moved between versions shows up here
# first, at no GPU time.
#
#     bash scripts/check-gpu-image.sh [pytest arguments]      # default: -q -x tests
#
# Builds a virtual environment ($VENV, default ~/.cache/gptfast/venv-gpu-image: outside the
# checkout, so it never travels with the working tree) with Python 3.12 where one runs
# (the image's; or $PYTHON), else the system python3, and torch==2.11.0, triton==3.6.0,
# transformers==5.17.0 as on the image. numpy stays below 2.4 (the image has 2.5): the Triton
# interpreter the tests use on a CPU needs it. Then installs gptfast in editable mode
# (building the C++ extension) and runs pytest. Not part of CI: torch 2.11.0 from PyPI is the
# CUDA build, several GB with its nvidia-* dependencies. Safe to re-run (the venv is reused).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gptfast/venv-gpu-image}
if [ -z "${PYTHON:-}" ]; then
    if python3.12 -c "pass" > /dev/null 2>&1; then PYTHON=python3.12; else PYTHON=python3; fi
fi
echo "check-gpu-image: $("$PYTHON" --version 2>&1) ($PYTHON) -> $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4" \
    pytest pytest-benchmark safetensors tokenizers hypothesis tqdm matplotlib ninja setuptools wheel
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
if [ $# -eq 0 ]; then set -- -q -x tests; fi
"$VENV/bin/python" -m pytest "$@"
