#!/usr/bin/env bash
# Install doppelbot into .venv and run the userbot (`doppelbot run`). On first use it tells you
# to log in (`.venv/bin/doppelbot login`). Usage: scripts/run.sh [doppelbot run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "is ignored" || true
exec .venv/bin/doppelbot run "$@"
