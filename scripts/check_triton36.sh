#!/usr/bin/env bash
# The kernels on Triton 3.6 (what the GPU image ships, with torch 2.11) as well as the pinned 3.9:
# a separate venv, .venv-triton36, with torch 2.13.0 (CPU) and triton 3.6.0, runs tests/kernels on
# Triton's interpreter, including the test that compiles every kernel for sm_90 and checks that it
# pipelines, uses wgmma and fits. With a GPU, run `pytest -m gpu tests/kernels` in that image instead.
#
# numpy < 2.4: Triton 3.6's interpreter turns 1-element arrays into Python ints with int(), which
# NumPy 2.4 made an error (Triton 3.9 does not do this; compiled kernels never see numpy).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-triton36
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_NO_INPUT=1
"$VENV/bin/python" -m pip --disable-pip-version-check -q install torch==2.13.0 triton==3.6.0 "numpy>=1.26,<2.4" pytest==9.2.0 \
    safetensors==0.8.0  # moe (imported by a few kernel tests) saves with it
echo "check_triton36: $("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/kernels "$@"
