"""The reply benchmark's numeric phase, run as the benchmark runs it.

The phase builds engines through the loader's internals (not ``load_reply_model``), so it is
where a changed settings default shows up first; the rest of the benchmark needs the 1.7B
shape and minutes of CPU, and is run by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_numeric_phase_scores_the_default_engine_and_a_variant(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "scripts/bench_reply.py",
            "--phase",
            "numeric",
            "--variants",
            "int4",
            "--threads",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["numeric_samples"] > 0
    default, int4 = report["default"], report["int4"]
    # int8 against the layer-by-layer fp32 reference of the same trained model: near-exact.
    assert default["top1_agreement"] >= 0.95
    assert 0 <= default["mean_kl"] < 0.01
    # A 4-bit grid is coarser than the int8 one: its distance to fp32 must show it.
    assert int4["mean_kl"] > default["mean_kl"]
