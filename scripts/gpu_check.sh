#!/usr/bin/env bash
# GPU check: run doppelbot's CUDA code paths once on a machine with an NVIDIA GPU.
#
# CI and the development machines have no GPU; this is the one place the CUDA paths run.
# Each step is guarded (a failure or a timeout never stops the next) and ends with a line
# "STEP PASS <name>" or "STEP FAIL <name>"; the last lines summarise them.
#
#   1. env     : nvidia-smi, torch/CUDA/transformers/peft/bitsandbytes versions.
#   2. checks  : scripts/gpu_check.py — tiny random FRED-T5 + real tokenizer, through the
#                product's loader/worker/trainer on CUDA: serving int8 (bitsandbytes LLM.int8,
#                LoRA unmerged), bf16, fp32; LoRA training fp32/bf16/int8 (k-bit), evaluation,
#                the trained adapter served; resume with the CUDA RNG state. PASS/FAIL per check.
#   3. bench   : scripts/bench_reply.py --device cuda on the exact FRED-T5-1.7B shape (random
#                weights): greedy and beams=2 latency, 321 tokens in / 32 out, int8 and bf16.
#                Needs the model config at $FRED_CONFIG (default .gpu/fred-t5-config.json, a
#                copy of ../shared/fred-t5/config.json: ../shared does not travel).
#   4. pytest  : the model and training test files with a GPU present (their unpinned
#                device="auto" paths then run on CUDA).
#
# Missing packages travel as wheels in .whl/ (ignored via .git/info/exclude); they are
# installed into /tmp/site and put first on PYTHONPATH (used on an H200 image with torch 2.11+cu130:
# bitsandbytes 0.50.2, transformers 5.24.0, peft 0.21.2, pydantic 2.14.4 + pydantic_core,
# pydantic-settings, python-dotenv, typing_extensions, typing-inspection, annotated-types,
# aiosqlite, platformdirs, regex, pytest-asyncio; fetched with `pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux...`). The bitsandbytes wheel
# (43 MB) fits the 64 MiB transfer once trimmed to libbitsandbytes_cuda130.so + _cpu.so (the
# other .so files and their RECORD lines removed): 3.6 MB. For the lent device machine:
#   run(command='set -o pipefail; bash scripts/gpu_check.sh 2>&1 | tee $OUT/log',
#       carry=[".whl", ".gpu"], timeout_s=480)
# On an H200 the steps took about 60 s (checks), 170 s (bench) and 45 s (pytest). Step time
# limits (seconds): CHECKS_S, BENCH_S, PYTEST_S; STEPS (default "checks bench pytest") picks
# steps; BENCH_RUNS the timed runs per variant (2). Without a GPU, CHECK_DEVICE=cpu
# STEPS="checks pytest" NO_WHEELS=1 PYTHON=.venv/bin/python tries the script on the CPU runtimes.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/doppelbot-gpu-check}
mkdir -p "$OUT"
FRED_CONFIG=${FRED_CONFIG:-.gpu/fred-t5-config.json}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "STEP FAIL install-wheels"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi

SUMMARY=()
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2 started rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - started ))
    if [ "$rc" -eq 0 ]; then
        echo "STEP PASS $name (${took}s)"
        SUMMARY+=("PASS $name (${took}s)")
    else
        [ "$rc" -eq 124 ] && echo "(timed out after ${limit}s)"
        echo "STEP FAIL $name (exit $rc, ${took}s)"
        SUMMARY+=("FAIL $name (exit $rc, ${took}s)")
    fi
}

env_report() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" - <<'EOF'
import importlib

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "pydantic", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(name, mod.__version__, mod.__file__)
    except Exception as exc:  # a missing package is reported, the other steps still run
        print(name, "MISSING", type(exc).__name__, exc)
EOF
}

echo "=== env"
env_report
STEPS=${STEPS:-checks bench pytest}
has() { [[ " $STEPS " == *" $1 "* ]]; }
has checks && step checks "${CHECKS_S:-150}" "$PY" scripts/gpu_check.py --device "${CHECK_DEVICE:-cuda}" \
    --json "$OUT/gpu_check.json"
if ! has bench; then
    echo "(bench skipped)"
elif [ -f "$FRED_CONFIG" ]; then
    step bench "${BENCH_S:-240}" "$PY" scripts/bench_reply.py --device cuda \
        --config "$FRED_CONFIG" --tokenizer tests/fixtures/fred-t5-tokenizer \
        --runs "${BENCH_RUNS:-2}" --workdir /tmp/doppelbot-bench-reply-cuda
else
    echo "STEP FAIL bench (no model config at $FRED_CONFIG)"
    SUMMARY+=("FAIL bench (no config)")
fi
has pytest && step pytest "${PYTEST_S:-100}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 \
    -o addopts="" tests/test_model_runtime.py tests/test_model_worker.py \
    tests/test_model_engine.py tests/test_model_cli.py tests/test_training.py \
    tests/test_training_units.py tests/test_dpo.py

echo "=== summary"
failed=0
for line in "${SUMMARY[@]}"; do
    echo "$line"
    [[ $line == FAIL* ]] && failed=$((failed + 1))
done
exit "$failed"
