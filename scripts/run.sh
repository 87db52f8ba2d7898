#!/usr/bin/env bash
# Install doppelbot into .venv and start the bot (`doppelbot run`).
#
# The first run installs CPU torch 2.13.0 and the dependencies (a few minutes, ~2 GB on disk;
# pip shows what it fetches). Later runs reinstall only when pyproject.toml changed. Before
# starting the bot it checks the settings, the Telegram login and the reply model; when one is
# missing it stops and prints the exact command to run next.
#
# Usage: scripts/run.sh [doppelbot run options...]
# Environment: PYTHON (default python3); TORCH_INDEX_URL to take torch from another index, e.g.
# https://download.pytorch.org/whl/cpu for the small CPU-only build on Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DOPPELBOT=.venv/bin/doppelbot
STAMP=.venv/.doppelbot-installed
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar on)

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi

wanted="$(cat pyproject.toml scripts/run.sh | cksum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$wanted" ]; then
    cat <<'EOF'
==> installing doppelbot into .venv (pip lists every package as it goes)
    1. torch 2.13.0. From PyPI on Linux that is the CUDA build (several GB with its NVIDIA
       libraries); TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives the CPU-only one.
    2. transformers, peft, accelerate, sentence-transformers, Telethon and the rest.
    The first install takes about 3–10 minutes, depending on the network. The models come
    later, with `doppelbot model download` (about 7.5 GB).
EOF
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
    else
        "${PIP[@]}" "torch==2.13.0"
    fi
    # torch first and pinned: the package's own range would let pip choose another build.
    "${PIP[@]}" -e .
    .venv/bin/python -c "import torch, doppelbot" # fail loudly if the install did not work
    echo "$wanted" > "$STAMP"
    echo "==> installed: $DOPPELBOT"
fi

# What is still missing, in the order a newcomer meets it; `ok` when the bot can start.
missing="$(.venv/bin/python - <<'EOF'
from doppelbot.config import load_settings
from doppelbot.core.errors import DoppelbotError, ModelMissingError
from doppelbot.model.local import model_source

try:
    settings = load_settings(".env")
except DoppelbotError as exc:
    print(f"settings {exc}")
    raise SystemExit
if settings.telegram.api_id is None or settings.telegram.api_hash is None:
    print("credentials")
elif settings.telegram.session_string is None and not settings.session_path.exists():
    print("login")
else:
    try:
        model_source(settings.model.base, settings.store.data_dir)
    except ModelMissingError as exc:
        print(f"model {exc}")
    else:
        print("ok")
EOF
)"

case "$missing" in
ok)
    exec "$DOPPELBOT" run "$@"
    ;;
settings*)
    echo "error: ${missing#settings }"
    echo "Fix it in .env (every setting is explained in .env.example), then run scripts/run.sh again."
    ;;
credentials)
    cat <<EOF
doppelbot needs your Telegram API id and hash (they identify the app, not you):
  1. open https://my.telegram.org → "API development tools" and create an app;
  2. $( [ -f .env ] && echo "edit .env" || echo "cp .env.example .env" ) and set DOPPELBOT_API_ID=... and DOPPELBOT_API_HASH=...
then run scripts/run.sh again. (No API id? \`$DOPPELBOT import result.json\` reads a Telegram
Desktop export without one — see the README's Quickstart.)
EOF
    ;;
login)
    echo "Next: log in to Telegram once (phone, the code Telegram sends, your 2FA password):"
    echo "    $DOPPELBOT login"
    echo "then run scripts/run.sh again."
    ;;
model*)
    echo "${missing#model }" | sed "s#\`doppelbot #\`$DOPPELBOT #g"
    echo "Next: download the models (FRED-T5-1.7B and the embedder, about 7.5 GB; resumable):"
    echo "    $DOPPELBOT model download"
    echo "then run scripts/run.sh again."
    ;;
*)
    echo "error: could not check the setup: $missing"
    ;;
esac
exit 1
