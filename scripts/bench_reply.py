"""Benchmark: one reply from FRED-T5-1.7B (int8, CPU) through the real model worker, judged
against this machine's own limits and against the usual alternatives *in the same run*.

Why: on shared VMs the same command takes 2 s one hour and 4 s the next, so seconds alone say
nothing. This bench reports ratios — to ``transformers`` + ``quantize_dynamic`` and to
``transformers`` fp32 timed in the same run, and to what the machine can do at best (its
memory bandwidth for decoding, its int8 GEMM throughput for the prompt) — repeated in
interleaved rounds (medians), with the CPU steal time of the run, so a noisy run can be told from
a slow program. Random weights of the exact FRED-T5-1.7B shape (``--config``): speed and memory
only; the numeric cost of a variant is measured separately on a small trained model.

Workload: a 321-token prompt (``PromptFormat`` with the default persona), exactly 32 new tokens
(min = max), batch 1, ``--threads`` torch threads (2); greedy and beams=2; served with a LoRA
adapter (r=16, alpha=32, q and v). Phases, each in its own process (peak RSS per phase):

- ``ckpt``: the random model saved as a safetensors checkpoint + adapter (setup, not timed);
- ``build`` (without and with the adapter): the real first start, ``load_engine`` streaming the
  checkpoint into the int8 cache — ``build_peak_rss_gb``, ``build_s``;
- per round (``--reps``, interleaved): ``limits`` (streaming read bandwidth of a buffer the size
  of the weights read per token, with the bench's threads; int8 GEMM throughput of the engine's
  kernel on the prompt's largest matrix product), ``serve`` for the default engine and each of
  ``--variants`` (``scripts/reply_variants.py``), then ``hf`` with ``quantize_dynamic`` and
  with fp32 (the checkpoint read by ``from_pretrained``, ``generate()``);
- ``numeric``: the tests' tiny FRED-shaped model LoRA-trained on their persona rule (40 steps),
  each engine kind scored against the fp32 reference like ``doppelbot model check``
  (top-1 agreement, mean KL, loss delta).

Reported (last line, JSON): ``ratio_vs_qdynamic`` / ``ratio_vs_fp32`` (greedy latency ÷ the
baseline's, median over rounds of the same-round ratios), ``decode_floor_ratio`` (measured decode
ms/token ÷ bytes read per token / bandwidth), ``encode_floor_ratio`` (encoder pass ÷ its MACs /
int8 GEMM throughput), ``build_peak_rss_gb``, ``peak_rss_gb`` (serving: cold start from the cache
+ generation), ``cold_start_s``, ``steal_pct`` (share of CPU time stolen by the hypervisor during
the timed rounds, /proc/stat; ``others_cpu_pct``: the share other processes of the same VM
used), the same ratios per variant, seconds, and the machine.
Targets: ``build_peak_rss_gb`` <= 3.5, ``ratio_vs_qdynamic`` <= 0.75, ``peak_rss_gb`` <= 3.

Usage: ``flock /tmp/doppelbot-bench.lock .venv/bin/python scripts/bench_reply.py [--reps 3]
[--runs 3] [--threads 2] [--variants int4,onednn-enc] [--workdir DIR] [--keep] [--skip-build]
[--skip-fp32] [--skip-numeric]``. Needs ~10 GB of free RAM (the fp32 phase) and ~11 GB of disk
in ``--workdir``; ~15 minutes on 2 cores.

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
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_TOKENS = 321
NEW_TOKENS = 32
TARGETS = {
    "build_peak_rss_gb": 3.5,
    "ratio_vs_qdynamic": 0.75,
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


def cpu_times() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq
    steal …), in ticks."""
    with open("/proc/stat", encoding="ascii") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def steal_pct(before: list[int], after: list[int]) -> float:
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta[:8])  # guest time is already counted in user
    return round(100 * delta[7] / total, 2) if total > 0 and len(delta) > 7 else 0.0


def others_pct(before: list[int], after: list[int], ours_s: float) -> float:
    """Share of all CPU time that *other* processes on this machine used meanwhile (busy time
    minus this bench's own children): a co-tenant of the VM slows a run as much as steal."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta[:8])
    busy = total - delta[3] - delta[4] - delta[7]  # minus idle, iowait, steal
    ours = ours_s * os.sysconf("SC_CLK_TCK")
    return round(100 * max(0.0, busy - ours) / total, 1) if total > 0 else 0.0


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    from doppelbot.model.engine import int8_weight_limit

    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    mem = next(
        (
            int(x.split()[1]) / 1024**2
            for x in Path("/proc/meminfo").read_text().splitlines()
            if x.startswith("MemTotal")
        ),
        0.0,
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_flags": " ".join(f for f in wanted if f in flags) or "none of the wide ones",
        "int8_weight_limit": int8_weight_limit(),
        "ram_gb": round(mem, 1),
        "torch": torch.__version__,
    }


def build_prompt(tokenizer_dir: Path) -> str:
    """A prompt in the bot's format with exactly ``PROMPT_TOKENS`` tokens: the newest turns
    that fit, then an oldest turn grown character by character to the exact count."""
    from doppelbot.config import PromptSettings
    from doppelbot.core.domain import Role, Turn
    from doppelbot.model.tokenizer import TokenCounter, load_tokenizer

    count = TokenCounter(load_tokenizer(tokenizer_dir))
    fmt = PromptSettings().format
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


def _dirs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    work = Path(args.workdir)
    return work / "base", work / "adapter", work / "cache"


# --- phases (each in its own process) -------------------------------------------------------------
def phase_ckpt(args: argparse.Namespace) -> dict[str, Any]:
    """Setup: the random model as an fp32 safetensors checkpoint (+ tokenizer) and an adapter."""
    base_dir, adapter_dir, _cache = _dirs(args)
    started = time.perf_counter()
    model = random_model(Path(args.config), seed=0)
    init_s = time.perf_counter() - started
    model.save_pretrained(base_dir, max_shard_size="2GB")
    for item in Path(args.tokenizer).iterdir():
        shutil.copy(item, base_dir / item.name)
    _random_adapter(model, adapter_dir)
    return {"init_s": round(init_s, 2), "ckpt_s": round(time.perf_counter() - started, 2)}


def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    """The first start: ``load_engine`` streams the checkpoint (+ adapter) into the cache."""
    import torch

    from doppelbot.config import ModelSettings
    from doppelbot.model.loader import ModelSpec, load_engine

    torch.set_num_threads(args.threads)
    base_dir, adapter_dir, cache_dir = _dirs(args)
    spec = ModelSpec(
        ModelSettings(base=str(base_dir), device="cpu", precision="int8"),
        adapter=adapter_dir if args.variant == "lora" else None,
        cache_dir=cache_dir,
    )
    info: dict[str, Any] = {}
    started = time.perf_counter()
    load_engine(spec, info=info)
    assert info.get("build") == "streamed" and info.get("from_cache") is False, info
    size = sum(p.stat().st_size for p in Path(info["cache"]).iterdir())
    return {
        "build_s": round(time.perf_counter() - started, 2),
        "cache_gb": round(size / 1024**3, 3),
        "build_peak_rss_gb": round(peak_rss_gb(), 2),
    }


def phase_limits(args: argparse.Namespace) -> dict[str, Any]:
    """This machine's limits for the two halves of a reply, with the bench's threads: the
    streaming read bandwidth of a buffer the size of the weights one decoded token reads, and
    the engine's int8 kernel on the prompt's largest matrix product (best of several)."""
    import torch

    from doppelbot.model.engine import EngineConfig, Int8Linear
    from doppelbot.model.loader import engine_config

    torch.set_num_threads(args.threads)
    base_dir, _adapter, _cache = _dirs(args)
    cfg: EngineConfig = engine_config(str(base_dir))
    nbytes = int(args.per_token_bytes)
    buf = torch.empty(nbytes // 4, dtype=torch.float32)
    buf.fill_(1.0)  # touch every page before timing

    def best(fn: Any, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    read_s = best(buf.amax, 7)
    del buf
    gen = torch.Generator().manual_seed(0)
    rows = 2 * cfg.d_ff if cfg.gated else cfg.d_ff
    layer = Int8Linear.quantize(torch.randn(rows, cfg.d_model, generator=gen) * 0.02)
    x = torch.randn(PROMPT_TOKENS, cfg.d_model, generator=gen)
    with torch.inference_mode():
        gemm_s = best(lambda: layer(x), 7)
    from reply_variants import encoder_macs

    gmacs = PROMPT_TOKENS * rows * cfg.d_model / gemm_s / 1e9
    return {
        "bandwidth_gbs": round(nbytes / read_s / 1e9, 2),
        "int8_gmacs": round(gmacs, 1),
        "encode_floor_s": round(encoder_macs(cfg, PROMPT_TOKENS) / (gmacs * 1e9), 4),
    }


def phase_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Cold start from the cache in the worker, then timed generations with the loop watched
    (``--engine`` other than default: that variant, converted after the cold start).
    On CUDA: the checkpoint read through the real loader, same workload."""
    import asyncio

    from doppelbot.config import GenerationOptions, load_settings
    from doppelbot.model.worker import model_worker
    from doppelbot.responder.loopmon import LoopLagMonitor

    work = Path(args.workdir)
    adapter = work / "adapter" if args.variant == "lora" else None
    settings = load_settings(
        None,
        data_dir=work,  # → settings.store.cache_dir = work / "cache", where the build phase wrote
        model=str(work / "base"),
        adapter_path=adapter,
        device=args.device,
        precision=args.precision,
        torch_threads=args.threads,
    )
    cuda = args.device == "cuda"
    prompt = (work / "prompt.txt").read_text(encoding="utf-8")

    def convert(m: Any, check: Any) -> float:
        """The variant's linears, from the checkpoint (+ adapter) like a build would."""
        from reply_variants import apply_variant

        from doppelbot.model.checkpoint import Checkpoint, LoraDeltas, WeightSource

        t = time.perf_counter()
        deltas = None if adapter is None else LoraDeltas(adapter)
        with Checkpoint.open(str(work / "base")) as ckpt:
            m.runtime.engine = apply_variant(
                m.runtime.engine, args.engine, WeightSource(ckpt, deltas)
            )
        return time.perf_counter() - t

    async def main() -> dict[str, Any]:
        worker = model_worker(settings)
        await worker.start()
        cold = time.perf_counter() - PROC_START
        model = worker.model
        assert model is not None, "no model loaded"
        assert cuda or model.info.get("from_cache") is True, model.info
        assert model.info["device"] == args.device, model.info
        rss_loaded = peak_rss_gb()
        results: dict[str, Any] = {"cold_start_s": round(cold, 2)}
        if not cuda and args.engine != "default":
            results["convert_s"] = round(await worker.submit(convert), 2)

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

        def decode_time(m: Any, check: Any) -> tuple[float, int]:
            """Seconds per decoded token (greedy, after the encoder pass and the cross k/v),
            and the bytes one step reads."""
            import torch
            from reply_variants import per_token_bytes

            engine = m.runtime.engine
            with torch.inference_mode():
                encoded = engine.encode(torch.tensor([m.encode(prompt)]))
                state = engine.start(encoded, max_len=NEW_TOKENS + 1)
                token = engine.config.decoder_start_token_id
                t = time.perf_counter()
                for _ in range(NEW_TOKENS):
                    token = int(engine.decode(state, torch.tensor([[token]]))[0, -1].argmax())
                elapsed = time.perf_counter() - t
            return elapsed / NEW_TOKENS, per_token_bytes(engine, PROMPT_TOKENS, NEW_TOKENS)

        async def latency(options: GenerationOptions) -> float:
            t = time.perf_counter()
            await worker.submit(lambda m, check: m.generate(prompt, options, check))
            return time.perf_counter() - t

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
        if not cuda:
            steps = [await worker.submit(decode_time) for _ in range(3)]
            results["decode_ms_per_token"] = round(statistics.median(s for s, _ in steps) * 1e3, 2)
            results["per_token_bytes"] = steps[0][1]
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


def phase_hf(args: argparse.Namespace) -> dict[str, Any]:
    """The baselines: ``transformers`` ``generate()`` on the same checkpoint and prompt, fp32
    or after ``torch.ao.quantization.quantize_dynamic`` (``--variant qdynamic``)."""
    import warnings

    import torch
    from transformers import T5ForConditionalGeneration

    from doppelbot.model.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    prompt = (work / "prompt.txt").read_text(encoding="utf-8")
    ids = load_tokenizer(args.tokenizer)(prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T5ForConditionalGeneration.from_pretrained(work / "base", dtype=torch.float32)
        model.eval()
        if args.variant == "qdynamic":
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
    runs = [run() for _ in range(args.runs)]
    return {
        "runs_s": [round(r, 3) for r in runs],
        "p50_s": round(statistics.median(runs), 3),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def phase_numeric(args: argparse.Namespace) -> dict[str, Any]:
    """The numeric cost of each engine kind, like ``doppelbot model check``: the tests' tiny
    FRED-shaped model (d_model 128), LoRA-trained 40 steps on their persona rule, scored on the
    validation split against the layer-by-layer fp32 reference."""
    import torch
    from reply_variants import apply_variant

    from doppelbot.config import ModelSettings, PromptSettings
    from doppelbot.model.check import compare, reference_logprobs
    from doppelbot.model.checkpoint import Checkpoint, LoraDeltas, WeightSource
    from doppelbot.model.generate import engine_target_logits
    from doppelbot.model.loader import ModelSpec, build_engine, engine_config
    from doppelbot.model.tokenizer import load_tokenizer, safe_ids
    from doppelbot.training.data import load_dataset
    from doppelbot.training.trainer import TrainOptions, train
    from tests.tiny_model import TOKENIZER_DIR
    from tests.training_helpers import PERSONA, build_tiny_model, write_persona_dataset

    torch.set_num_threads(args.threads)
    root = Path(args.workdir) / "numeric"
    shutil.rmtree(root, ignore_errors=True)
    model_dir = build_tiny_model(root / "model", TOKENIZER_DIR, d_model=128)
    write_persona_dataset(root / "datasets")
    trained = train(
        TrainOptions(
            model=ModelSettings(base=str(model_dir), device="cpu", torch_threads=args.threads),
            prompt=PromptSettings(persona=PERSONA),
            batch_size=12,
            grad_accum=1,
            lr=5e-3,
            max_steps=40,
            gradient_checkpointing=False,
        ),
        datasets_dir=root / "datasets",
        runs_dir=root / "runs",
        adapters_dir=root / "adapters",
    )
    spec = ModelSpec(
        ModelSettings(base=str(model_dir), device="cpu", precision="int8"), trained.adapter_dir
    )
    cfg = engine_config(str(model_dir))
    tok = load_tokenizer(model_dir)

    def ids(text: str) -> list[int]:
        return safe_ids(tok(text, add_special_tokens=False).input_ids, cfg.vocab_size)

    rows = load_dataset(root / "datasets").validation
    samples = [(ids(r.model_input), ids(r.model_target)) for r in rows]
    targets = [t for _i, t in samples]
    ref = reference_logprobs(spec, cfg, samples)
    out: dict[str, Any] = {"numeric_samples": len(samples)}
    engine = build_engine(spec, cfg)
    for kind in ("default", *args.variant_list):
        candidate = engine
        if kind != "default":
            with Checkpoint.open(str(model_dir)) as ckpt:
                source = WeightSource(ckpt, LoraDeltas(trained.adapter_dir))
                candidate = apply_variant(engine, kind, source)
        cand = [
            torch.log_softmax(engine_target_logits(candidate, i, t), dim=-1) for i, t in samples
        ]
        report = compare(ref, cand, targets)
        out[kind] = {
            "top1_agreement": round(report.top1_agreement, 4),
            "mean_kl": round(report.mean_kl, 5),
            "loss_delta": round(report.loss_delta, 5),
        }
    return out


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


PHASES = {
    "ckpt": phase_ckpt,
    "build": phase_build,
    "limits": phase_limits,
    "serve": phase_serve,
    "hf": phase_hf,
    "numeric": phase_numeric,
    "build_hf": phase_build_hf,
}


def child(args: argparse.Namespace, phase: str, **extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase]
    for key in ("config", "tokenizer", "workdir", "runs", "threads", "device", "variants"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    print(f"… {phase} {' '.join(f'{k}={v}' for k, v in extra.items())}", file=sys.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"phase {phase} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT.parent / "shared/fred-t5/config.json")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared/fred-t5/tokenizer")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (medians over them)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per phase (after warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--variants",
        default="auto",
        help="engine variants to time (scripts/reply_variants.py), comma-separated, 'none', or "
        "auto: int4,onednn-enc (+ bf16-enc where the CPU has AVX512-BF16 or AMX)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/doppelbot-bench-reply"))
    ap.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint, caches)")
    ap.add_argument("--skip-build", action="store_true", help="reuse checkpoint + caches")
    ap.add_argument("--skip-fp32", action="store_true", help="no fp32 baseline")
    ap.add_argument("--skip-numeric", action="store_true", help="no numeric check")
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
    ap.add_argument("--engine", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--per-token-bytes", default="0", help=argparse.SUPPRESS)
    ap.add_argument(
        "--variant",
        choices=["base", "lora", "fp32", "qdynamic"],
        default="lora",
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    args.variant_list = _variants(args.variants)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "prompt.txt").write_text(build_prompt(args.tokenizer), encoding="utf-8")
    if args.device == "cuda":
        main_cuda(args)
        return
    try:
        result = run_cpu(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    report(result)


def _variants(spec: str) -> list[str]:
    if spec == "none":
        return []
    if spec != "auto":
        return [v.strip() for v in spec.split(",") if v.strip()]
    out = ["int4", "onednn-enc"]
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        flags = []
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        out.append("bf16-enc")
    return out


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    setup: dict[str, Any] = {}
    if not args.skip_build:
        setup.update(child(args, "ckpt"))
        builds = [child(args, "build", variant=v) for v in ("base", "lora")]
        setup["build_peak_rss_gb"] = max(b["build_peak_rss_gb"] for b in builds)
        setup["build_s"] = builds[1]["build_s"]
        setup["cache_gb"] = builds[1]["cache_gb"]
    kinds = ["default", *args.variant_list]
    rounds: list[dict[str, Any]] = []
    before, ours_before = cpu_times(), children_cpu_s()
    base: dict[str, Any] = {}
    for rep in range(args.reps):
        r: dict[str, Any] = {"serve": {}}
        r["serve"]["default"] = child(args, "serve", variant="lora")
        r["limits"] = child(
            args, "limits", per_token_bytes=str(r["serve"]["default"]["per_token_bytes"])
        )
        for kind in kinds[1:]:
            r["serve"][kind] = child(args, "serve", variant="lora", engine=kind)
        r["qdynamic"] = child(args, "hf", variant="qdynamic")
        if not args.skip_fp32:
            r["fp32"] = child(args, "hf", variant="fp32")
        if rep == 0:
            base = child(args, "serve", variant="base")
        rounds.append(r)
        print(json.dumps({"round": rep, **r}), file=sys.stderr, flush=True)
    after = cpu_times()
    steal = steal_pct(before, after)
    others = others_pct(before, after, children_cpu_s() - ours_before)
    numeric = {} if args.skip_numeric else child(args, "numeric")
    return {
        "setup": setup,
        "rounds": rounds,
        "base": base,
        "kinds": kinds,
        "steal_pct": steal,
        "others_cpu_pct": others,
        "numeric": numeric,
        "machine": machine(),
        "args": args,
    }


def _kind_stats(rounds: list[dict[str, Any]], kind: str, skip_fp32: bool) -> dict[str, Any]:
    serve = [r["serve"][kind] for r in rounds]
    greedy = [s["greedy_p50_s"] for s in serve]
    decode_floor = [
        s["decode_ms_per_token"]
        / (s["per_token_bytes"] / (r["limits"]["bandwidth_gbs"] * 1e9) * 1e3)
        for s, r in zip(serve, rounds, strict=True)
    ]
    encode_floor = [
        s["encode_s_p50"] / r["limits"]["encode_floor_s"]
        for s, r in zip(serve, rounds, strict=True)
    ]
    out: dict[str, Any] = {
        "latency_s_p50": _median(greedy),
        "beams2_latency_s_p50": _median([s["beams2_p50_s"] for s in serve]),
        "encode_s_p50": _median([s["encode_s_p50"] for s in serve]),
        "decode_ms_per_token": _median([s["decode_ms_per_token"] for s in serve]),
        "per_token_gb": round(serve[0]["per_token_bytes"] / 1e9, 3),
        "decode_floor_ratio": round(statistics.median(decode_floor), 2),
        "encode_floor_ratio": round(statistics.median(encode_floor), 2),
        "ratio_vs_qdynamic": round(
            statistics.median(
                g / r["qdynamic"]["p50_s"] for g, r in zip(greedy, rounds, strict=True)
            ),
            3,
        ),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in serve),
        "cold_start_s": _median([s["cold_start_s"] for s in serve]),
        "loop_lag_p99_ms": max(s["loop_lag_p99_ms"] for s in serve),
    }
    if not skip_fp32:
        out["ratio_vs_fp32"] = round(
            statistics.median(g / r["fp32"]["p50_s"] for g, r in zip(greedy, rounds, strict=True)),
            3,
        )
    if kind != "default":
        out["ratio_vs_default"] = round(
            statistics.median(
                g / r["serve"]["default"]["greedy_p50_s"]
                for g, r in zip(greedy, rounds, strict=True)
            ),
            3,
        )
        out["convert_s"] = _median([s.get("convert_s", 0.0) for s in serve])
    return out


def report(res: dict[str, Any]) -> None:
    args, rounds = res["args"], res["rounds"]
    stats = {k: _kind_stats(rounds, k, args.skip_fp32) for k in res["kinds"]}
    numeric = res["numeric"]
    default = stats["default"]
    limits = {
        "bandwidth_gbs": _median([r["limits"]["bandwidth_gbs"] for r in rounds]),
        "int8_gmacs": _median([r["limits"]["int8_gmacs"] for r in rounds]),
    }
    qdyn = _median([r["qdynamic"]["p50_s"] for r in rounds])
    fp32 = None if args.skip_fp32 else _median([r["fp32"]["p50_s"] for r in rounds])

    # The same-run table: every kind, medians over the interleaved rounds.
    head = (
        f"{'kind':<12}{'greedy s':>9}{'beams2 s':>9}{'encode s':>9}{'ms/tok':>8}"
        f"{'dec/floor':>10}{'enc/floor':>10}{'vs qdyn':>8}{'vs fp32':>8}{'RSS GB':>7}"
        f"{'top-1':>7}{'KL':>9}"
    )
    print(head)
    for kind, s in stats.items():
        num = numeric.get(kind, {})
        print(
            f"{kind:<12}{s['latency_s_p50']:>9.3f}{s['beams2_latency_s_p50']:>9.3f}"
            f"{s['encode_s_p50']:>9.3f}{s['decode_ms_per_token']:>8.1f}"
            f"{s['decode_floor_ratio']:>10.2f}{s['encode_floor_ratio']:>10.2f}"
            f"{s['ratio_vs_qdynamic']:>8.3f}{s.get('ratio_vs_fp32', float('nan')):>8.3f}"
            f"{s['peak_rss_gb']:>7.2f}{num.get('top1_agreement', float('nan')):>7.3f}"
            f"{num.get('mean_kl', float('nan')):>9.5f}"
        )
    print(f"{'qdynamic':<12}{qdyn:>9.3f}{'':>54}{1.0:>8.3f}")
    if fp32 is not None:
        print(f"{'fp32':<12}{fp32:>9.3f}")
    print()

    result: dict[str, Any] = {
        "ratio_vs_qdynamic": default["ratio_vs_qdynamic"],
        "ratio_vs_fp32": default.get("ratio_vs_fp32"),
        "decode_floor_ratio": default["decode_floor_ratio"],
        "encode_floor_ratio": default["encode_floor_ratio"],
        "build_peak_rss_gb": res["setup"].get("build_peak_rss_gb"),
        "peak_rss_gb": max(default["peak_rss_gb"], res["base"].get("peak_rss_gb", 0.0)),
        "cold_start_s": default["cold_start_s"],
        "steal_pct": res["steal_pct"],
        "others_cpu_pct": res["others_cpu_pct"],
        "latency_s_p50": default["latency_s_p50"],
        "beams2_latency_s_p50": default["beams2_latency_s_p50"],
        "latency_s_p50_no_lora": res["base"].get("greedy_p50_s"),
        "qdynamic_latency_s_p50": qdyn,
        "fp32_latency_s_p50": fp32,
        "encode_s_p50": default["encode_s_p50"],
        "decode_ms_per_token": default["decode_ms_per_token"],
        "per_token_gb": default["per_token_gb"],
        **limits,
        "loop_lag_p99_ms": default["loop_lag_p99_ms"],
        "build_s": res["setup"].get("build_s"),
        "cache_gb": res["setup"].get("cache_gb"),
        "qdynamic_peak_rss_gb": max(r["qdynamic"]["peak_rss_gb"] for r in rounds),
        "reps": args.reps,
        "runs": args.runs,
        "threads": args.threads,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        **res["machine"],
        "load": round(os.getloadavg()[0], 2),
        "numeric_default": numeric.get("default"),
        "variants": {
            k: {**v, "numeric": numeric.get(k)} for k, v in stats.items() if k != "default"
        },
        "greedy_runs_s": [r["serve"]["default"]["greedy_runs_s"] for r in rounds],
        "qdynamic_runs_s": [r["qdynamic"]["runs_s"] for r in rounds],
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key == "variants":
            continue
        target = TARGETS.get(key)
        verdict = (
            ""
            if target is None or value is None
            else ("  ok" if value <= target else f"  MISSED (<= {target})")
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
