#!/usr/bin/env bash
# Create .venv and install adacc with its test and benchmark extras.
# torch is installed first, pinned to a CPU-only release where one is on
# offer, so that the project's torch range does not pull a multi-GB CUDA build
# onto machines without a GPU. Set ADACC_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${ADACC_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
