#!/usr/bin/env bash
# Install doppelbot into .venv (CPU torch 2.13.0, the package and its dev extra) and run the
# test suite. Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch first and pinned: a range would pull a multi-GB CUDA build from the index.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, doppelbot" # fail loudly if the install did not work
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check doppelbot tests scripts
exec .venv/bin/python -m pytest "$@"
