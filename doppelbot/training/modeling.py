"""Loading FRED-T5 for training and evaluation, and wrapping it with LoRA.

Training needs more than the serving loader gives: an int8 base prepared for k-bit training on
CUDA (bitsandbytes LLM.int8, fp32 norms/embeddings, gradient checkpointing), trainable LoRA
weights in fp32, and an adapter that may be resumed or continued. On CPU the base is fp32 (or
bf16) so the very same code runs in the tests with tiny models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from doppelbot.core.errors import ModelLoadError, TrainingError
from doppelbot.model.loader import check_untied

PRECISIONS = ("auto", "int8", "bf16", "fp32")


def resolve_precision(requested: str, device: str) -> str:
    if requested not in PRECISIONS:
        raise TrainingError(
            f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})"
        )
    if requested == "auto":
        return "int8" if device == "cuda" else "fp32"
    if requested == "int8" and device != "cuda":
        raise TrainingError(
            "int8 training needs a CUDA GPU (bitsandbytes LLM.int8); on CPU use --precision fp32"
        )
    return requested


def load_config(model_name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the config of {model_name}: {exc}") from exc


def load_base_model(model_name: str, *, device: str, precision: str, device_index: int = 0) -> Any:
    """The base seq2seq model on ``device`` at ``precision`` (frozen by the LoRA wrapper)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    kwargs: dict[str, Any] = {}
    if precision == "int8":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise TrainingError(
                f"int8 training needs bitsandbytes with CUDA support ({exc}); "
                "install it or use --precision bf16"
            ) from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device_index}
    else:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load base model {model_name}: {exc}") from exc
    check_untied(model, model_name)
    if precision != "int8":
        model.to(torch.device(device, device_index) if device == "cuda" else device)
    return model


def lora_config(
    *, r: int, alpha: int, dropout: float, targets: Sequence[str], inference: bool = False
) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM,
        inference_mode=inference,
    )


def prepare_for_training(
    base: Any,
    *,
    precision: str,
    lora: Any,
    init_adapter: Path | None,
    gradient_checkpointing: bool,
) -> Any:
    """Freeze the base, add trainable LoRA weights (new, or continued from ``init_adapter``)."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}  # no need for inputs that require grad
    base.config.use_cache = False  # incompatible with checkpointing; useless in training
    if precision == "int8":
        # fp32 norms/embeddings/lm_head and input grads, as peft's k-bit recipe prescribes.
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif gradient_checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if init_adapter is not None:
        try:
            model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load adapter {init_adapter}: {exc}") from exc
    else:
        model = get_peft_model(base, lora)
    _trainable_in_fp32(model)
    return model


def _trainable_in_fp32(model: Any) -> None:
    """LoRA weights must stay fp32 on a bf16 base: Adafactor updates underflow in bf16."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def load_adapter_for_eval(base: Any, adapters: Sequence[Path]) -> tuple[Any, list[str]]:
    """One base with several named adapters (switch with ``set_adapter``; base alone with
    ``disable_adapter()``), so comparing two adapters loads the 1.7 B base only once."""
    from peft import PeftModel

    if not adapters:
        return base, []
    names = [f"a{i}" for i in range(len(adapters))]
    try:
        model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
        for name, path in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(str(path), adapter_name=name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load adapter: {exc}") from exc
    model.eval()
    return model, names


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
