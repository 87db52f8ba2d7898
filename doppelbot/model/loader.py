"""Loading the reply model: base + LoRA adapter → a ``ReplyModel`` at the chosen precision.

Two runtimes, picked by ``select_runtime(device, precision)``:

- ``engine`` (CPU, any precision): ``T5Engine`` is built straight from the checkpoint files,
  weight by weight, with the adapter merged into each weight just before it is converted
  (``doppelbot.model.checkpoint``; merged because that is free at run time, unlike an unmerged
  LoRA on int8) — int8 per-channel linears run by fbgemm, the fastest int8 path measured on
  this hardware. The fp32 model is never held whole, so the first start needs about the
  memory of the int8 model, not of the fp32 one. The int8 result is written to the on-disk
  cache during the build (``doppelbot.model.cache``); later starts read the cache alone. An
  adapter that is more than plain LoRA goes the old way (the fp32 model through
  ``transformers`` + peft), with the memory that takes.
- ``hf`` (CUDA): ``transformers`` + ``generate()``. int8 is bitsandbytes LLM.int8
  (``BitsAndBytesConfig(load_in_8bit=True)``), the adapter stays a peft wrapper (merging into
  LLM.int8 weights would re-round them); bf16/fp32 get the adapter merged. ``auto`` precision
  is bf16 when it fits in the free GPU memory, else int8 (``doppelbot.model.memory``).

Before any weight is read, the load's peak memory is estimated and compared with what is free
(``doppelbot.model.memory.preflight``): one clear line instead of the OOM killer.

FRED-T5's lm_head is separate from its input embeddings, while transformers 5 declares every T5
tied; ``check_untied`` refuses a load that came out tied. Token ids the model has no embedding
for (``<|endoftext|>`` = 50364) are mapped to ``<pad>`` before they reach it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from doppelbot.config import GenerationOptions, ModelSettings, Settings, default_of
from doppelbot.core.errors import ModelLoadError
from doppelbot.core.ports import ModelIdentity
from doppelbot.model.local import model_source
from doppelbot.model.tokenizer import load_tokenizer, safe_ids
from doppelbot.store.database import Database
from doppelbot.training.registry import current_adapter

if TYPE_CHECKING:
    import torch

    from doppelbot.model.cache import PendingEntry
    from doppelbot.model.engine import EngineConfig, T5Engine
    from doppelbot.model.memory import PrecisionChoice

log = logging.getLogger(__name__)

Runtime = Literal["engine", "hf"]
Progress = Callable[[str, int, int], None]  # (stage, done, total)
Check = Callable[[], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load: the model section (its ``base`` — a hub id or a folder, as configured —
    device, precision, memory check and input budget) with this load's adapter.
    ``cache_dir`` None disables the quantised-model cache; ``source`` is the local folder the
    base model's files are read from when that differs from ``base`` (a downloaded hub model,
    ``doppelbot.model.local``)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    adapter: Path | None = None
    cache_dir: Path | None = None
    source: str | None = None

    @property
    def files(self) -> str:
        """Where the base model's files are read from (``model.base`` names the model)."""
        return self.source or self.model.base

    def at(self, precision: str) -> ModelSpec:
        """This spec at another precision (checked: one of the model section's)."""
        return replace(self, model=replace(self.model, precision=precision))  # type: ignore[arg-type]


def model_spec(settings: Settings, *, adapter: Path | None = None) -> ModelSpec:
    """The configured model (``settings.model``) with ``adapter``, the data directory's cache,
    and the downloaded copy of a hub model (``ModelMissingError`` when there is none)."""

    return ModelSpec(
        settings.model,
        adapter,
        settings.store.cache_dir,
        model_source(settings.model.base, settings.store.data_dir),
    )


# --- choices ------------------------------------------------------------------------------------
def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(requested: str, *, has_cuda: bool | None = None) -> str:
    if requested not in ("auto", "cpu", "cuda"):
        raise ModelLoadError(f"unknown device {requested!r} (auto, cpu or cuda)")
    cuda = cuda_available() if has_cuda is None else has_cuda
    if requested == "auto":
        return "cuda" if cuda else "cpu"
    if requested == "cuda" and not cuda:
        raise ModelLoadError("DOPPELBOT_DEVICE=cuda, but torch sees no CUDA GPU")
    return requested


def apply_torch_threads(threads: int | None) -> None:
    """``DOPPELBOT_TORCH_THREADS`` for the calling thread's torch work (None: torch's default,
    all cores)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def engine_config(base: str) -> EngineConfig:
    """The base model's shape, from its ``config.json`` alone (no weights read)."""
    from transformers import T5Config

    from doppelbot.model.engine import EngineConfig

    with _expected_noise():
        try:
            config = T5Config.from_pretrained(base)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"cannot load the base model {base}: {exc}") from exc
    return EngineConfig.from_hf(config)


def cuda_free_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_precision(
    requested: str, device: str, cfg: EngineConfig, *, free_gpu: int | None = None
) -> PrecisionChoice:
    """``auto`` → int8 on the CPU; on CUDA bf16 when it fits in the free GPU memory with
    room to spare, else int8. ``free_gpu`` overrides the measurement (tests)."""
    from doppelbot.model.memory import PrecisionChoice, choose_cuda_precision

    if requested not in ("auto", "int8", "bf16", "fp32"):
        raise ModelLoadError(f"unknown precision {requested!r} (auto, int8, bf16 or fp32)")
    if device != "cuda":
        if requested == "auto":
            return PrecisionChoice("int8", "int8 on the CPU")
        return PrecisionChoice(requested, f"{requested} as set (DOPPELBOT_PRECISION)")
    free = cuda_free_bytes() if free_gpu is None else free_gpu
    return choose_cuda_precision(requested, cfg, free, has_int8=_has_bitsandbytes())


def select_runtime(device: str, precision: str) -> Runtime:
    """``engine`` for the CPU (int8 = fbgemm dynamic int8), ``hf`` for CUDA (int8 =
    bitsandbytes LLM.int8)."""
    if precision not in ("int8", "bf16", "fp32"):
        raise ModelLoadError(f"unknown precision {precision!r} (int8, bf16 or fp32)")
    if device == "cpu":
        return "engine"
    if device == "cuda":
        return "hf"
    raise ModelLoadError(f"unknown device {device!r}")


def hf_load_kwargs(device: str, precision: str) -> dict[str, Any]:
    """``from_pretrained`` arguments of the ``hf`` runtime."""
    import torch

    if device == "cuda" and precision == "int8":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ModelLoadError(
                f"int8 on CUDA needs bitsandbytes ({exc}); install it or set "
                "DOPPELBOT_PRECISION=bf16"
            ) from exc
        return {
            "quantization_config": BitsAndBytesConfig(load_in_8bit=True),
            "device_map": {"": 0},
        }
    if precision == "int8":
        raise ModelLoadError("the transformers runtime does int8 only on CUDA")
    return {"dtype": torch.bfloat16 if precision == "bf16" else torch.float32}


# --- checkpoint loading -------------------------------------------------------------------------
def _declared_untied(base: str) -> bool:
    path = Path(base).expanduser() / "config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(base, "config.json")
        except (OSError, ValueError):
            return False
        if found is None:
            return False
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("tie_word_embeddings") is False
    except (OSError, ValueError):
        return False


def check_untied(model: Any, base: str) -> None:
    """transformers 5 forces ``tie_word_embeddings=True`` on T5 and unties only when the
    checkpoint holds both matrices with different values. A head that came out tied although the
    checkpoint's config says separate would silently be a different model: refuse it."""
    head, shared = getattr(model, "lm_head", None), getattr(model, "shared", None)
    if head is None or shared is None:
        return
    if head.weight.data_ptr() == shared.weight.data_ptr() and _declared_untied(base):
        raise ModelLoadError(
            f"{base}: lm_head came out tied to the input embeddings although the checkpoint "
            "declares them separate (tie_word_embeddings=false); refusing a different model"
        )


@contextmanager
def _expected_noise() -> Iterator[None]:
    """Loading FRED-T5 makes transformers/peft warn about exactly the untied head we want (and
    show per-tensor progress bars); ``check_untied`` verifies the outcome instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tie.*embeddings.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_model(
    base: str, adapter: Path | None, *, device: str, precision: str, merge: bool
) -> Any:
    """``T5ForConditionalGeneration`` with the adapter applied (merged when ``merge``)."""
    from transformers import T5ForConditionalGeneration

    # On the CPU the checkpoint is always read in fp32: the engine converts it afterwards.
    kwargs = hf_load_kwargs(device, precision if device == "cuda" else "fp32")
    with _expected_noise():
        try:
            model = T5ForConditionalGeneration.from_pretrained(base, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the base model {base}: {exc}") from exc
        check_untied(model, base)
        if adapter is not None:
            model = apply_adapter(model, adapter, merge=merge)
    if device == "cuda" and precision != "int8":
        model.to("cuda")
    return model.eval()


def apply_adapter(model: Any, adapter: Path, *, merge: bool) -> Any:
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the adapter {adapter}: {exc}") from exc
    return wrapped.merge_and_unload() if merge else wrapped


def adapter_id(adapter: Path | None) -> str | None:
    return None if adapter is None else adapter.name


# --- the loaded model -----------------------------------------------------------------------------
class EngineRuntime:
    """CPU: ``T5Engine`` + the decoding loop of ``doppelbot.model.generate``."""

    def __init__(self, engine: T5Engine) -> None:
        self.engine = engine
        self.vocab_size = engine.config.vocab_size
        self.pad_token_id = engine.config.pad_token_id
        self.eos_token_id = engine.config.eos_token_id

    def generate_ids(
        self, ids: Sequence[int], options: GenerationOptions, stop_ids: Sequence[int], check: Check
    ) -> list[int]:
        from doppelbot.model.generate import generate_with_engine

        return generate_with_engine(self.engine, ids, options, stop_ids=stop_ids, check=check)

    def target_logits(self, ids: Sequence[int], target: Sequence[int]) -> torch.Tensor:
        from doppelbot.model.generate import engine_target_logits

        return engine_target_logits(self.engine, ids, target)


class HFRuntime:
    """CUDA (or any ``transformers`` model): ``generate()`` with a deadline-checking
    ``StoppingCriteria``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.pad_token_id = int(config.pad_token_id or 0)
        self.eos_token_id = int(config.eos_token_id if config.eos_token_id is not None else 1)
        self.device = next(model.parameters()).device

    def generate_ids(
        self, ids: Sequence[int], options: GenerationOptions, stop_ids: Sequence[int], check: Check
    ) -> list[int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from doppelbot.model.generate import hf_generate_kwargs

        class _Deadline(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                check()  # raises GenerationTimeoutError: generate() unwinds, the thread is free
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        if options.seed is not None:
            torch.manual_seed(options.seed)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        kwargs = hf_generate_kwargs(options, stop_ids=stop_ids, pad_token_id=self.pad_token_id)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                stopping_criteria=StoppingCriteriaList([_Deadline()]),
                **kwargs,
            )
        tokens = out[0].tolist()[1:]  # drop the decoder start token
        # generate() pads finished sequences; keep up to the first stop token.
        stops = set(stop_ids)
        for i, tok in enumerate(tokens):
            if tok in stops:
                return tokens[: i + 1]
        return tokens

    def target_logits(self, ids: Sequence[int], target: Sequence[int]) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            labels = torch.tensor([list(target)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=input_ids, labels=labels)
            return out.logits[0].float().cpu()


@dataclass
class ReplyModel:
    """A loaded model as the worker thread uses it: text in, raw model text out."""

    runtime: EngineRuntime | HFRuntime
    tokenizer: Any
    identity: ModelIdentity
    device: str = "cpu"
    precision: str = "fp32"
    max_input_tokens: int = default_of(ModelSettings, "max_input_tokens")
    info: dict[str, Any] = field(default_factory=dict)  # load stats: seconds, from_cache, …
    stop_ids: list[int] = field(default_factory=list)  # default: </s> and <extra_id_1…>

    def __post_init__(self) -> None:
        from doppelbot.model.generate import stop_token_ids

        if not self.stop_ids:
            self.stop_ids = stop_token_ids(
                self.tokenizer, self.runtime.eos_token_id, self.runtime.vocab_size
            )

    def encode(self, text: str, *, limit: int | None = None) -> list[int]:
        """Token ids of ``text`` as the model may see them (no special tokens added, unknown
        ids → pad). Over ``limit`` the *oldest* tokens go, but the first one (FRED's ``<SC1>``
        mode token) stays: the newest turn and the answer cue are at the end."""

        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        ids = safe_ids(ids, self.runtime.vocab_size, self.runtime.pad_token_id)
        if limit is not None and len(ids) > limit:
            log.warning("prompt of %d tokens cut to the last %d", len(ids), limit)
            ids = ids[:1] + ids[len(ids) - limit + 1 :]
        return ids or [self.runtime.pad_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return str(
            self.tokenizer.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )

    def generate(self, prompt: str, options: GenerationOptions, check: Check = lambda: None) -> str:
        """The raw generated text (``<extra_id_0>…</s>``); ``prompt.decode_reply`` cleans it."""
        ids = self.encode(prompt, limit=self.max_input_tokens)
        out = self.runtime.generate_ids(ids, options, self.stop_ids, check)
        return self.decode(out)

    def target_logprobs(self, model_input: str, model_target: str) -> torch.Tensor:
        """Log-probabilities ``[T, V]`` over the target's tokens (teacher forcing)."""
        import torch

        target = self.encode(model_target)
        ids = self.encode(model_input, limit=self.max_input_tokens)
        logits = self.runtime.target_logits(ids, target)
        return torch.log_softmax(logits.float(), dim=-1)


# --- loading ------------------------------------------------------------------------------------
def load_reply_model(spec: ModelSpec, progress: Progress = _no_progress) -> ReplyModel:
    """Load ``spec``; see the module docstring for what happens per device/precision."""

    started = time.perf_counter()
    device = resolve_device(spec.model.device)
    cfg = engine_config(spec.files)
    choice = resolve_precision(spec.model.precision, device, cfg)
    spec = spec.at(choice.precision)
    log.info("reply model on %s: %s", device, choice.reason)
    runtime_kind = select_runtime(device, spec.model.precision)
    tokenizer = load_tokenizer(spec.files)
    info: dict[str, Any] = {
        "runtime": runtime_kind,
        "device": device,
        "precision_reason": choice.reason,
    }
    if runtime_kind == "engine":
        runtime: EngineRuntime | HFRuntime = EngineRuntime(
            load_engine(spec, progress=progress, info=info, config=cfg)
        )
    else:
        _preflight_hf(spec, cfg)
        progress("loading the model", 0, 1)
        model = load_hf_model(
            spec.files,
            spec.adapter,
            device=device,
            precision=spec.model.precision,
            merge=spec.model.precision != "int8",
        )
        progress("loading the model", 1, 1)
        runtime = HFRuntime(model)
    if runtime.vocab_size > len(tokenizer):
        raise ModelLoadError(
            f"{spec.model.base}: the model has {runtime.vocab_size} embeddings but the tokenizer "
            f"only {len(tokenizer)} ids"
        )
    info["load_s"] = round(time.perf_counter() - started, 3)
    return ReplyModel(
        runtime=runtime,
        tokenizer=tokenizer,
        identity=ModelIdentity(spec.model.base, adapter_id(spec.adapter)),
        device=device,
        precision=spec.model.precision,
        max_input_tokens=spec.model.max_input_tokens,
        info=info,
    )


def _preflight_hf(spec: ModelSpec, cfg: EngineConfig) -> None:
    """The ``hf`` runtime on CUDA: the weights must fit in the GPU's free memory, and bf16/fp32
    pass through host RAM on their way there."""
    from doppelbot.model.memory import CUDA_WORK, RUNTIME, cuda_weight_bytes, preflight

    p = spec.model.precision
    smaller = ["DOPPELBOT_PRECISION=int8"] if p != "int8" else []
    preflight(
        f"the {p} model on the GPU",
        cuda_weight_bytes(cfg, p) + CUDA_WORK,
        hints=[*smaller, "a smaller DOPPELBOT_MODEL", "DOPPELBOT_DEVICE=cpu"],
        enabled=spec.model.memory_check,
        available=cuda_free_bytes(),
        resource="GPU memory",
    )
    host = RUNTIME + (cuda_weight_bytes(cfg, p) if p != "int8" else 0)
    preflight(
        f"loading the {p} model",
        host,
        hints=["a smaller DOPPELBOT_MODEL"],
        enabled=spec.model.memory_check,
    )


def load_engine(
    spec: ModelSpec,
    *,
    progress: Progress = _no_progress,
    info: dict[str, Any] | None = None,
    config: EngineConfig | None = None,
) -> T5Engine:
    """The CPU engine for ``spec``: from the cache when there is one (int8), else built from
    the checkpoint (and cached)."""
    from doppelbot.model import cache
    from doppelbot.model.engine import T5Engine, release_free_memory
    from doppelbot.model.memory import preflight, serve_bytes

    info = {} if info is None else info
    cfg = config or engine_config(spec.files)
    folder = None
    if spec.cache_dir is not None and spec.model.precision == "int8":
        key = cache.cache_key(spec.files, spec.adapter, spec.model.precision)
        folder = cache.cache_folder(spec.cache_dir, key)
        info["cache"] = str(folder)
        if cache.is_complete(folder):
            preflight(
                "loading the int8 model",
                serve_bytes(cfg, spec.model.precision),
                hints=["a smaller DOPPELBOT_MODEL"],
                enabled=spec.model.memory_check,
            )
            try:
                engine = T5Engine.load(
                    folder, progress=lambda d, t: progress("loading the int8 model", d, t)
                )
            except ModelLoadError as exc:
                log.warning("discarding an unreadable model cache (%s); rebuilding it", exc)
                cache.discard(folder)
            else:
                release_free_memory()
                info["from_cache"] = True
                return engine
    info["from_cache"] = False
    entry = None if folder is None else cache.PendingEntry(folder, cfg, spec.model.precision)
    try:
        engine = build_engine(spec, cfg, progress=progress, sink=entry, info=info)
    except BaseException:
        if entry is not None:
            entry.discard()
        raise
    release_free_memory()
    engine.meta.update({"base": spec.model.base, "adapter": adapter_id(spec.adapter)})
    if entry is not None:
        progress("writing the model cache", 0, 1)
        entry.commit(engine.meta)
        progress("writing the model cache", 1, 1)
    return engine


def build_engine(
    spec: ModelSpec,
    cfg: EngineConfig,
    *,
    progress: Progress = _no_progress,
    sink: PendingEntry | None = None,
    info: dict[str, Any] | None = None,
) -> T5Engine:
    """``T5Engine`` at ``spec.model.precision`` from the checkpoint + adapter, streamed weight by
    weight (or, for an adapter that is more than plain LoRA, through transformers + peft)."""
    from doppelbot.model.checkpoint import (
        Checkpoint,
        LoraDeltas,
        UnsupportedAdapter,
        WeightSource,
        checkpoint_files,
        resident_bytes,
    )
    from doppelbot.model.engine import T5Engine
    from doppelbot.model.memory import build_bytes, preflight, whole_model_bytes

    p = spec.model.precision
    stage = "quantising to int8" if p == "int8" else f"converting to {p}"
    hints = ["DOPPELBOT_PRECISION=int8"] if p != "int8" else []
    hints.append("a smaller DOPPELBOT_MODEL")
    info = {} if info is None else info
    try:
        deltas = None if spec.adapter is None else LoraDeltas(spec.adapter)
    except UnsupportedAdapter as exc:
        log.info("the adapter is not plain LoRA (%s): merging it with peft on the full model", exc)
        preflight(
            f"building the {p} model (adapter merged by peft)",
            whole_model_bytes(cfg, p),
            hints=hints,
            enabled=spec.model.memory_check,
        )
        info["build"] = "peft"
        progress("loading the fp32 checkpoint", 0, 1)
        model = load_hf_model(spec.files, spec.adapter, device="cpu", precision="fp32", merge=True)
        progress("loading the fp32 checkpoint", 1, 1)
        engine = T5Engine.from_hf(
            model, p, consume=True, progress=lambda d, t: progress(stage, d, t)
        )
        del model
        if sink is not None:
            for name, tensor in engine.tensors_in_order():
                sink.put(name, tensor)
        return engine
    files = checkpoint_files(spec.files)
    preflight(
        f"building the {p} model",
        build_bytes(cfg, p, resident_bytes(files)),
        hints=hints,
        enabled=spec.model.memory_check,
    )
    info["build"] = "streamed"
    with Checkpoint(files) as checkpoint:
        if "lm_head.weight" not in checkpoint and _declared_untied(spec.files):
            raise ModelLoadError(
                f"{spec.model.base}: the checkpoint has no lm_head although its config declares it "
                "separate from the input embeddings (tie_word_embeddings=false)"
            )
        source = WeightSource(checkpoint, deltas)
        return T5Engine.build(
            cfg, source, p, progress=lambda d, t: progress(stage, d, t), sink=sink
        )


async def serving_adapter(settings: Settings) -> Path | None:
    """The adapter the bot serves: ``DOPPELBOT_ADAPTER_PATH`` when set, else the one chosen
    with ``doppelbot adapter use`` (recorded in the database); None = the base model alone."""
    if settings.model.adapter_path is not None:
        return settings.model.adapter_path
    if not settings.store.db_path.exists():
        return None

    db = await Database.open(settings.store.db_path)
    try:
        return await current_adapter(settings, db)
    finally:
        await db.close()
