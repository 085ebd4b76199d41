#!/usr/bin/env bash
# Create (or reuse) .venv in the repository and install everything the project needs from its own
# files: torch first (CPU build 2.13.0 unless CUDA is present or TORCH_SPEC says otherwise), then
# the pinned requirements, then this package in editable mode. Safe to run again: it only installs
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: Python >= 3.10 is required ($("$PYTHON" --version 2>&1) found)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_NO_INPUT=1

# torch: an explicit pin, never a range, so a CPU machine never pulls a multi-GB CUDA build.
if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC"
fi

stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pinned requirements"
    "${PIP[@]}" install -r requirements.txt
    "${PIP[@]}" install --no-deps -e .
    echo "$want" > "$stamp"
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
