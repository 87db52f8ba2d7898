"""Benchmark LoRA fine-tuning on this CPU: training tokens/s and peak RSS per step.

Two model sizes with FRED-T5's real vocabulary (50,364) and tokenizer, randomly initialised:
``tiny`` (d_model 64, 2+2 layers — the tests' model) and ``small`` (d_model 512, d_ff 1024,
6+6 layers, ~90 M parameters). Each size runs in its own child process (so peak RSS is its
own) through the real trainer (``doppelbot.training.trainer.train``): LoRA r=16 on q,v,
Adafactor, gradient checkpointing, fp32, seed-format prompts of ~150 tokens. The first step is
a warm-up and is not counted. ``--config ../shared/fred-t5/config.json`` adds the real
FRED-T5-1.7B shape (slow on CPU: minutes per step).

CUDA (int8 base through bitsandbytes) cannot be measured here: this machine has no GPU.

    flock /tmp/doppelbot-bench.lock .venv/bin/python scripts/bench_train.py
    .venv/bin/python scripts/bench_train.py --sizes tiny --steps 10

The script also takes /tmp/doppelbot-bench.lock itself (unless a ``flock`` wrapper above it
already holds it), so two benchmarks never overlap. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOCK_PATH = Path("/tmp/doppelbot-bench.lock")
TOKENIZER = ROOT / "tests" / "fixtures" / "fred-t5-tokenizer"
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2},
    "small": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_heads": 8, "num_layers": 6},
}
_PROSE = (
    "привет как дела что делаешь сегодня вечером пойдем в кино да нет норм работаю ладно "
    "хорошо давай завтра потом может быть спасибо окей слушай смотри вообще я ты мы дома "
    "на работе устал поехали встретимся где когда почему конечно понял отлично классно"
)
WORDS = _PROSE.split()


def _held_by_ancestor(path: Path) -> bool:
    """Whether a ``flock`` wrapper among our ancestors already holds the lock file."""
    try:
        inode = path.stat().st_ino
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    holders = set()
    for line in locks:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}"):
            holders.add(int(parts[4]))
    pid = os.getppid()
    for _ in range(8):
        if pid in holders:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def bench_lock() -> Any:
    fh = LOCK_PATH.open("a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fh
    except OSError:
        if _held_by_ancestor(LOCK_PATH):
            return fh
    print(f"waiting for {LOCK_PATH} (another benchmark is running)…", file=sys.stderr)
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    return fh


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def build_model(folder: Path, size: str, config_path: Path | None) -> int:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if config_path is not None:
        raw = json.loads(config_path.read_text())
        config = T5Config(**raw)
    else:
        dims = SIZES[size]
        config = T5Config(
            vocab_size=50364,
            num_decoder_layers=dims["num_layers"],
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
            **dims,
        )
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    for item in TOKENIZER.iterdir():
        shutil.copy(item, folder / item.name)
    return sum(p.numel() for p in model.parameters())


def write_dataset(datasets_dir: Path, n: int) -> None:
    from doppelbot.config import PromptSettings
    from doppelbot.core.domain import Role, Sample, Turn
    from doppelbot.dataset.jsonl import set_latest, write_samples

    rng = random.Random(0)
    prompt = PromptSettings().format

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    samples = []
    for i in range(n):
        turns = [
            Turn(Role.OTHER if (k % 2 == 0) else Role.OWNER, text(3, 12))
            for k in range(rng.randint(3, 6))
        ]
        if turns[-1].role is Role.OWNER:
            turns.append(Turn(Role.OTHER, text(3, 12)))
        reply = text(2, 10)
        model_input, model_target = prompt.build_input(turns), prompt.build_target(reply)
        ids = (i,)
        samples.append(
            Sample(1, tuple(turns), reply, 1000 + i, 900 + i, ids, ids, model_input, model_target)
        )
    write_samples(datasets_dir / "bench" / "train.jsonl", samples)
    write_samples(datasets_dir / "bench" / "validation.jsonl", samples[:6])
    set_latest(datasets_dir, "bench")


def child(size: str, steps: int, threads: int, config_path: Path | None) -> dict[str, Any]:
    """One size, in this (fresh) process."""
    import torch

    from doppelbot.config import ModelSettings, PromptSettings
    from doppelbot.training.runs import LOG_FILE
    from doppelbot.training.trainer import train
    from doppelbot.training.types import TrainOptions

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-train-{size}-"))
    try:
        params = build_model(tmp / "model", size, config_path)
        batch = 6
        write_dataset(tmp / "datasets", batch * (steps + 1))
        rss_after: list[float] = []

        def on_step(event: Any) -> None:
            rss_after.append(rss_mb())

        options = TrainOptions(
            model=ModelSettings(base=str(tmp / "model"), device="cpu", torch_threads=threads),
            prompt=PromptSettings(),
            precision="fp32",
            batch_size=batch,
            grad_accum=1,
            max_steps=steps + 1,
            save_steps=10_000,  # the final checkpoint only
            eval_max_samples=6,
            resume=False,
        )
        start_rss = rss_mb()
        result = train(
            options,
            datasets_dir=tmp / "datasets",
            runs_dir=tmp / "runs",
            adapters_dir=tmp / "adapters",
            callbacks=[on_step],
        )
        entries = [json.loads(x) for x in (result.run_dir / LOG_FILE).read_text().splitlines()]
        run = json.loads((result.run_dir / "run.json").read_text())
        measured = entries[1:]  # step 1 is the warm-up
        step_s = [e["step_s"] for e in measured]  # forward+backward+update, no checkpointing I/O
        tokens_per_step = [
            entries[i]["tokens"] - entries[i - 1]["tokens"] for i in range(1, len(entries))
        ]
        return {
            "size": size,
            "params_m": round(params / 1e6, 2),
            "trainable_m": round(run["parameters"]["trainable"] / 1e6, 3),
            "steps_measured": len(measured),
            "batch_size": batch,
            "tokens_per_step": round(statistics.mean(tokens_per_step), 1),
            "step_s_median": round(statistics.median(step_s), 4),
            "tokens_per_s": round(statistics.mean(tokens_per_step) / statistics.median(step_s), 1),
            "rss_mb_before": round(start_rss, 1),
            "rss_mb_per_step_max": round(max(rss_after), 1),
            "peak_rss_mb": round(rss_mb("VmHWM"), 1),
            # The pre-flight estimate for the same run, to keep it honest.
            "preflight_estimate_mb": round(run["preflight"]["estimate_bytes"] / 2**20, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help="comma list of tiny, small")
    parser.add_argument("--steps", type=int, default=0, help="measured steps (default per size)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--config", type=Path, help="also the model of this T5 config.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        config = args.config if args.child == "config" else None
        out = child(args.child, args.steps, args.threads, config)
        print(json.dumps(out))
        return

    lock = bench_lock()
    sizes = [s for s in args.sizes.split(",") if s]
    runs = [(s, args.steps or (20 if s == "tiny" else 5)) for s in sizes]
    if args.config:
        runs.append(("config", args.steps or 2))
    results = []
    for size, steps in runs:
        cmd = [sys.executable, __file__, "--child", size, "--steps", str(steps)]
        cmd += ["--threads", str(args.threads)]
        if args.config:
            cmd += ["--config", str(args.config)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{size}: child failed")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lock.close()

    header = ("size", "params M", "tokens/step", "s/step", "tokens/s", "RSS/step MB", "peak MB")
    header += ("estimate MB",)
    print(" | ".join(header))
    for r in results:
        print(
            " | ".join(
                str(x)
                for x in (
                    r["size"], r["params_m"], r["tokens_per_step"], r["step_s_median"],
                    r["tokens_per_s"], r["rss_mb_per_step_max"], r["peak_rss_mb"],
                    r["preflight_estimate_mb"],
                )
            )
        )  # fmt: skip
    print(
        "fp32 LoRA r=16 q,v, Adafactor, gradient checkpointing, batch 6 × accum 1, "
        f"{args.threads} threads; CUDA/int8 not measured (no GPU on this machine)"
    )
    summary = {
        "threads": args.threads,
        "cuda": "not measured: no GPU on this machine",
        **{
            f"{r['size']}_{k}": r[k]
            for r in results
            for k in ("tokens_per_s", "step_s_median", "peak_rss_mb", "rss_mb_per_step_max")
        },
        "runs": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
