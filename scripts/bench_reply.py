"""Benchmark: one reply from FRED-T5-1.7B (int8, CPU) through the real model worker.

Why: the bot's answer time on a laptop-class CPU is dominated by the reply model. This measures
the serving path end to end — the quantised-model cache loaded by ``load_reply_model`` inside
the ``ModelWorker`` thread, a prompt in the seed's format, ``worker.submit`` from the event loop
— on random weights of the exact FRED-T5-1.7B shape (``--config``; speed and memory only, never
quality), against ``transformers`` fp32 ``generate()`` in the same run as the baseline.

Workload: a 321-token prompt (``PromptFormat`` with the default persona), exactly 32 new tokens
(min = max), batch 1, ``--threads`` torch threads (2), medians of ``--runs`` runs after one
warm-up; greedy and beams=2; without and with a LoRA adapter (r=16, alpha=32, q and v; merged
before quantisation, as served). Each phase runs in its own subprocess, so peak RSS is
measured per phase: ``build`` (random fp32 model → int8 caches; the one-time first start),
``serve`` (cold start from the cache + generation; ``peak_rss_gb`` is this process' peak over
load AND generation), ``fp32`` (the baseline).

Reported: ``latency_s_p50`` / ``beams2_latency_s_p50`` (with the LoRA adapter: what is served),
the same without it, ``fp32_latency_s_p50``, ``speedup_vs_fp32``, ``encode_s_p50`` (the
321-token encoder pass), ``decode_ms_per_token`` ((greedy - encode) / 32), ``peak_rss_gb``,
``cold_start_s`` (serve process start → model ready, imports included), ``loop_lag_p99_ms``
(a 10 ms timer on the event loop while the worker generates).
Targets: latency <= 1.3 s, beams=2 <= 1.6 s, peak RSS <= 3 GB, cold start <= 10 s,
loop lag p99 < 50 ms.

Usage: ``flock /tmp/doppelbot-bench.lock .venv/bin/python scripts/bench_reply.py --config
../shared/fred-t5/config.json --tokenizer ../shared/fred-t5/tokenizer [--runs 5] [--threads 2]
[--workdir DIR] [--keep] [--skip-build] [--skip-fp32] [--reference-int8]``.
``--reference-int8`` also times transformers + ``quantize_dynamic`` (the int8 path the issue
measured at 1.74 s) in the same run: on a busy machine absolute figures drift, the ratio holds
better. Needs ~10 GB of free RAM (the fp32 phases) and ~4 GB
of disk in ``--workdir``. Prints a table; the last line is one JSON object.

``--device cuda`` measures the CUDA serving path instead (``transformers`` ``generate()``,
see ``doppelbot.model.loader``): the random model is saved as a bf16 checkpoint + LoRA adapter
(``build_hf``), then one ``serve`` process per ``--precisions`` entry (int8 = bitsandbytes
LLM.int8 with the adapter unmerged, bf16/fp32 merged) loads it through the worker and times the
same workload; int8 is also timed without the adapter (``--skip-base`` drops that). Reported per
precision: ``cuda_<p>_latency_s_p50``, ``cuda_<p>_beams2_latency_s_p50``, ``..._encode_s_p50``,
``..._load_s``, ``..._gpu_peak_gb`` (no CPU targets apply). Needs ~8 GB of disk and RAM.
"""

from __future__ import annotations

import time

PROC_START = time.perf_counter()  # before the heavy imports: cold start counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_TOKENS = 321
NEW_TOKENS = 32
TARGETS = {
    "latency_s_p50": 1.3,
    "beams2_latency_s_p50": 1.6,
    "peak_rss_gb": 3.0,
    "cold_start_s": 10.0,
    "loop_lag_p99_ms": 50.0,
}
PHRASES = [
    "привет, ты сегодня вечером свободен?",
    "да, после семи буду дома, а что?",
    "хотел позвать тебя в кино на новый фильм",
    "звучит отлично, во сколько сеанс?",
    "в девять, возле метро встретимся",
    "договорились, возьму билеты заранее",
    "слушай, а ты ужинать будешь до кино или после?",
    "давай лучше после, посидим в кафе на углу",
]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB → GiB


def build_prompt(tokenizer_dir: Path) -> str:
    """A prompt in the seed's format with exactly ``PROMPT_TOKENS`` tokens: the newest turns
    that fit, then an oldest turn grown character by character to the exact count."""
    from doppelbot.config import DEFAULT_PERSONA
    from doppelbot.domain import Role, Turn
    from doppelbot.model.tokenizer import TokenCounter, load_tokenizer
    from doppelbot.prompt import PromptFormat

    count = TokenCounter(load_tokenizer(tokenizer_dir))
    fmt = PromptFormat(DEFAULT_PERSONA)
    turns = [
        Turn(Role.OTHER if i % 2 == 0 else Role.OWNER, PHRASES[i % len(PHRASES)]) for i in range(60)
    ]
    while count(fmt.build_input(turns)) > PROMPT_TOKENS - 8:
        turns = turns[1:]
    filler = " ".join(PHRASES)
    for n in range(1, len(filler)):
        text = fmt.build_input([Turn(Role.OWNER, filler[:n]), *turns])
        if count(text) == PROMPT_TOKENS:
            return text
    raise SystemExit(f"could not build a {PROMPT_TOKENS}-token prompt")


def random_model(config_path: Path, seed: int) -> Any:
    """``T5ForConditionalGeneration`` of the config's exact shape, random weights, untied
    head (built on the meta device, then filled: ~20x faster than transformers' own init)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = json.loads(config_path.read_text())
    config = T5Config(**cfg)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.fill_(1.0)
            elif "relative_attention_bias" in name:
                param.normal_(0.0, 0.5, generator=gen)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)
    # to_empty() gives every module its own storage: the stacks' input embeddings are the
    # shared matrix again, the head stays separate (as in FRED-T5).
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
    assert model.lm_head.weight is not model.shared.weight
    return model.eval()


# --- phases (each in its own process) -------------------------------------------------------------
def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    """Random fp32 model → int8 cache without adapter; + LoRA (merged) → int8 cache with it."""
    import torch

    from doppelbot.model import cache
    from doppelbot.model.engine import T5Engine

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    base_dir, adapter_dir, cache_dir = work / "base", work / "adapter", work / "cache"
    # The "base model folder": config + tokenizer (the cache key fingerprints these files).
    base_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config, base_dir / "config.json")
    for item in Path(args.tokenizer).iterdir():
        shutil.copy(item, base_dir / item.name)

    started = time.perf_counter()
    model = random_model(Path(args.config), seed=0)
    init_s = time.perf_counter() - started

    started = time.perf_counter()
    engine = T5Engine.from_hf(model, "int8")
    quant_s = time.perf_counter() - started
    cache.save_engine(
        engine, cache.cache_folder(cache_dir, cache.cache_key(str(base_dir), None, "int8"))
    )
    del engine

    peft_model = _random_adapter(model, adapter_dir)
    merged = peft_model.merge_and_unload()
    started = time.perf_counter()
    engine = T5Engine.from_hf(merged, "int8", consume=True)
    quant_lora_s = time.perf_counter() - started
    key = cache.cache_key(str(base_dir), adapter_dir, "int8")
    cache.save_engine(engine, cache.cache_folder(cache_dir, key))
    size = sum(p.stat().st_size for p in cache.cache_folder(cache_dir, key).iterdir())
    return {
        "init_s": round(init_s, 2),
        "quantise_s": round(quant_s, 2),
        "quantise_lora_s": round(quant_lora_s, 2),
        "cache_gb": round(size / 1024**3, 3),
        "build_peak_rss_gb": round(peak_rss_gb(), 2),
    }


def phase_build_hf(args: argparse.Namespace) -> dict[str, Any]:
    """CUDA: the random model as a bf16 checkpoint folder (+ tokenizer) and a LoRA adapter."""
    import torch

    work = Path(args.workdir)
    base_dir, adapter_dir = work / "base", work / "adapter"
    started = time.perf_counter()
    model = random_model(Path(args.config), seed=0).to(torch.bfloat16)
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    model.save_pretrained(base_dir)
    for item in Path(args.tokenizer).iterdir():
        shutil.copy(item, base_dir / item.name)
    save_s = time.perf_counter() - started
    _random_adapter(model, adapter_dir)
    return {"init_s": round(init_s, 2), "save_s": round(save_s, 2)}


def _random_adapter(model: Any, adapter_dir: Path) -> Any:
    """A LoRA (r=16 on q, v) with random B, saved to ``adapter_dir``; returns the peft model."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q", "v"],
        task_type=TaskType.SEQ_2_SEQ_LM,
    )
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter really change things
                param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype) * 0.01)
    peft_model.save_pretrained(adapter_dir)
    return peft_model


def phase_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Cold start from the cache in the worker, then timed generations with the loop watched.
    On CUDA: the checkpoint read through the real loader, same workload."""
    import asyncio

    from doppelbot.config import load_settings
    from doppelbot.domain import GenerationOptions
    from doppelbot.model.worker import ModelWorker
    from doppelbot.responder.loopmon import LoopLagMonitor

    work = Path(args.workdir)
    adapter = work / "adapter" if args.variant == "lora" else None
    settings = load_settings(
        None,
        data_dir=work,  # → settings.cache_dir = work / "cache", where the build phase wrote
        model=str(work / "base"),
        adapter_path=adapter,
        device=args.device,
        precision=args.precision,
        torch_threads=args.threads,
    )
    cuda = args.device == "cuda"
    prompt = (work / "prompt.txt").read_text(encoding="utf-8")

    async def main() -> dict[str, Any]:
        worker = ModelWorker.from_settings(settings)
        await worker.start()
        cold = time.perf_counter() - PROC_START
        model = worker.model
        assert model is not None, "no model loaded"
        assert cuda or model.info.get("from_cache") is True, model.info
        assert model.info["device"] == args.device, model.info
        rss_loaded = peak_rss_gb()

        def produced(options: GenerationOptions) -> Any:
            def count(m: Any, check: Any) -> int:
                ids = m.encode(prompt, limit=m.max_input_tokens)
                assert len(ids) == PROMPT_TOKENS, len(ids)
                return len(m.runtime.generate_ids(ids, options, m.stop_ids, check))

            return count

        def encode_time(m: Any, check: Any) -> float:
            import torch

            ids = torch.tensor([m.encode(prompt)])
            if cuda:  # the transformers runtime: its encoder stack, synchronised
                ids = ids.to(m.runtime.device)
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    m.runtime.model.get_encoder()(input_ids=ids)
                torch.cuda.synchronize()
                return time.perf_counter() - t
            t = time.perf_counter()
            with torch.inference_mode():
                m.runtime.engine.encode(ids)
            return time.perf_counter() - t

        async def latency(options: GenerationOptions) -> float:
            t = time.perf_counter()
            await worker.submit(lambda m, check: m.generate(prompt, options, check))
            return time.perf_counter() - t

        results: dict[str, Any] = {"cold_start_s": round(cold, 2)}
        greedy = GenerationOptions(
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        beams = GenerationOptions(
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=2
        )
        for opts in (greedy, beams):  # exactly the workload: 321 tokens in, 32 out
            tokens = await worker.submit(produced(opts))
            assert tokens == NEW_TOKENS, tokens
        monitor = LoopLagMonitor(interval_s=0.01)
        monitor.start()
        for name, opts in (("greedy", greedy), ("beams2", beams)):
            await latency(opts)  # warm-up
            runs = [await latency(opts) for _ in range(args.runs)]
            results[f"{name}_runs_s"] = [round(r, 3) for r in runs]
            results[f"{name}_p50_s"] = round(statistics.median(runs), 3)
        await monitor.stop()
        enc = [await worker.submit(encode_time) for _ in range(3)]
        results["encode_s_p50"] = round(statistics.median(enc), 3)
        results["loop_lag_p99_ms"] = round(monitor.percentile(99) * 1000, 2)
        results["loop_lag_max_ms"] = round(monitor.max * 1000, 2)
        results["rss_after_load_gb"] = round(rss_loaded, 2)
        results["load_s"] = model.info.get("load_s")
        if cuda:
            import torch

            results["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
            results["gpu"] = torch.cuda.get_device_name()
        await worker.aclose()
        results["peak_rss_gb"] = round(peak_rss_gb(), 2)
        return results

    return asyncio.run(main())


def phase_fp32(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline: transformers fp32 ``generate()`` on the same shape and prompt (with
    ``--variant qdynamic``: the same after ``torch.ao.quantization.quantize_dynamic``, the int8
    path the issue measured as the reference)."""
    import warnings

    import torch

    from doppelbot.model.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    prompt = (work / "prompt.txt").read_text(encoding="utf-8")
    ids = load_tokenizer(args.tokenizer)(prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids])
    model = random_model(Path(args.config), seed=0)
    if args.variant == "qdynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(
                model, {torch.nn.Linear}, dtype=torch.qint8
            )

    def run() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=1,
            )
        assert out.shape[1] == NEW_TOKENS + 1, out.shape
        return time.perf_counter() - t

    run()  # warm-up
    runs = [run() for _ in range(args.fp32_runs)]
    return {
        "fp32_runs_s": [round(r, 3) for r in runs],
        "fp32_p50_s": round(statistics.median(runs), 3),
        "fp32_peak_rss_gb": round(peak_rss_gb(), 2),
    }


PHASES = {
    "build": phase_build,
    "build_hf": phase_build_hf,
    "serve": phase_serve,
    "fp32": phase_fp32,
}


def child(args: argparse.Namespace, phase: str, **extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase]
    for key in ("config", "tokenizer", "workdir", "runs", "threads", "fp32_runs", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    print(f"… {phase} {' '.join(f'{k}={v}' for k, v in extra.items())}", file=sys.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"phase {phase} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT.parent / "shared/fred-t5/config.json")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared/fred-t5/tokenizer")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per variant (after warm-up)")
    ap.add_argument("--fp32-runs", type=int, default=3, help="timed fp32 baseline runs")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/doppelbot-bench-reply"))
    ap.add_argument("--keep", action="store_true", help="keep the workdir (caches) afterwards")
    ap.add_argument("--skip-build", action="store_true", help="reuse the caches in --workdir")
    ap.add_argument("--skip-fp32", action="store_true", help="no fp32 baseline")
    ap.add_argument(
        "--reference-int8",
        action="store_true",
        help="also time transformers + quantize_dynamic (the issue's reference int8 path)",
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: time the transformers runtime on the GPU (see the module docstring)",
    )
    ap.add_argument(
        "--precisions", default="int8,bf16", help="with --device cuda: comma-separated precisions"
    )
    ap.add_argument("--skip-base", action="store_true", help="cuda: no int8 run without LoRA")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="int8", help=argparse.SUPPRESS)
    ap.add_argument(
        "--variant",
        choices=["base", "lora", "fp32", "qdynamic"],
        default="lora",
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "prompt.txt").write_text(build_prompt(args.tokenizer), encoding="utf-8")
    if args.device == "cuda":
        main_cuda(args)
        return
    try:
        build = {} if args.skip_build else child(args, "build")
        base = child(args, "serve", variant="base")
        lora = child(args, "serve", variant="lora")
        fp32 = {} if args.skip_fp32 else child(args, "fp32", variant="fp32")
        qdyn = child(args, "fp32", variant="qdynamic") if args.reference_int8 else {}
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    result: dict[str, Any] = {
        "latency_s_p50": lora["greedy_p50_s"],
        "beams2_latency_s_p50": lora["beams2_p50_s"],
        "latency_s_p50_no_lora": base["greedy_p50_s"],
        "beams2_latency_s_p50_no_lora": base["beams2_p50_s"],
        "fp32_latency_s_p50": fp32.get("fp32_p50_s"),
        "speedup_vs_fp32": (round(fp32["fp32_p50_s"] / lora["greedy_p50_s"], 2) if fp32 else None),
        "encode_s_p50": lora["encode_s_p50"],
        "decode_ms_per_token": round(
            (lora["greedy_p50_s"] - lora["encode_s_p50"]) / NEW_TOKENS * 1000, 1
        ),
        "peak_rss_gb": max(base["peak_rss_gb"], lora["peak_rss_gb"]),
        "rss_after_load_gb": lora["rss_after_load_gb"],
        "cold_start_s": max(base["cold_start_s"], lora["cold_start_s"]),
        "loop_lag_p99_ms": max(base["loop_lag_p99_ms"], lora["loop_lag_p99_ms"]),
        "loop_lag_max_ms": max(base["loop_lag_max_ms"], lora["loop_lag_max_ms"]),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "runs": args.runs,
        **build,
        "fp32_peak_rss_gb": fp32.get("fp32_peak_rss_gb"),
        "qdynamic_latency_s_p50": qdyn.get("fp32_p50_s"),
        "greedy_runs_s": lora["greedy_runs_s"],
        "beams2_runs_s": lora["beams2_runs_s"],
        "fp32_runs_s": fp32.get("fp32_runs_s"),
        "load": os.getloadavg()[0],
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        target = TARGETS.get(key)
        verdict = (
            "" if target is None else ("  ok" if value <= target else f"  MISSED (<= {target})")
        )
        print(f"{key:<{width}}  {value}{verdict}")
    print(json.dumps(result))


def main_cuda(args: argparse.Namespace) -> None:
    """``--device cuda``: one checkpoint, then one serving process per precision (and int8
    without the adapter), each through the real loader and worker."""
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    result: dict[str, Any] = {"device": "cuda"}
    try:
        if not args.skip_build:
            result.update(child(args, "build_hf"))
            print(json.dumps(result), file=sys.stderr, flush=True)
        runs = [(p, "lora") for p in precisions]
        if "int8" in precisions and not args.skip_base:
            runs.append(("int8", "base"))
        for precision, variant in runs:
            out = child(args, "serve", variant=variant, precision=precision)
            key = f"cuda_{precision}" + ("_no_lora" if variant == "base" else "")
            result["gpu"] = out.get("gpu")
            result[f"{key}_latency_s_p50"] = out["greedy_p50_s"]
            result[f"{key}_beams2_latency_s_p50"] = out["beams2_p50_s"]
            result[f"{key}_encode_s_p50"] = out["encode_s_p50"]
            result[f"{key}_decode_ms_per_token"] = round(
                (out["greedy_p50_s"] - out["encode_s_p50"]) / NEW_TOKENS * 1000, 1
            )
            result[f"{key}_load_s"] = out["load_s"]
            result[f"{key}_cold_start_s"] = out["cold_start_s"]
            result[f"{key}_gpu_peak_gb"] = out.get("gpu_peak_gb")
            result[f"{key}_loop_lag_p99_ms"] = out["loop_lag_p99_ms"]
            result[f"{key}_greedy_runs_s"] = out["greedy_runs_s"]
            # Each figure as soon as it exists: a run cut short still reports what it measured.
            print(json.dumps({key: out}), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    result.update(prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, runs=args.runs)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
