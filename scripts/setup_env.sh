#!/usr/bin/env bash
# Create or refresh .venv with labkit and everything it needs.
# On a machine without an NVIDIA GPU this installs the CPU build of PyTorch, never the
# multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${LABKIT_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "labkit setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "labkit setup: NVIDIA GPU found, installing torch==$TORCH_VERSION with CUDA"
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    else
        echo "labkit setup: no GPU, installing the CPU build of torch==$TORCH_VERSION"
        # A local wheel (pip's find-links) or PyPI's CPU index; never the CUDA wheels.
        "${PIP[@]}" install "torch==$TORCH_VERSION" --only-binary=:all: 2>/dev/null \
            || "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

echo "labkit setup: installing labkit and its dependencies"
"${PIP[@]}" install -e ".[dev,hub]"
# The kernel nbgrader and the notebooks run in: this environment, by name.
.venv/bin/python -m ipykernel install --sys-prefix --name labkit --display-name "labkit (.venv)" >/dev/null
echo "labkit setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
