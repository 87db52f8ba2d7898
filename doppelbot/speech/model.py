"""Which speech model to load, how to decode with it, and the one function that loads it.

``load_whisper(spec)`` is the only place a Whisper model is loaded: a faster-whisper size name
(``small``), a CTranslate2-converted model id on the Hugging Face hub (downloaded once into
``DOPPELBOT_DATA_DIR/cache/speech``), or a local folder holding ``model.bin``, ``config.json``,
``vocabulary.*``, ``tokenizer.json`` and (optionally) ``preprocessor_config.json``. Precision is
int8 on CPU and float16 on CUDA unless set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppelbot.config import Settings, VoiceSettings
from doppelbot.core.errors import ModelMissingError, SpeechModelError
from doppelbot.model.local import model_source, speech_repo


def decode_kwargs(voice: VoiceSettings) -> dict[str, Any]:
    """faster-whisper's ``transcribe`` knobs doppelbot sets (the rest keep its defaults).

    Notes are short and timestamps unused, so decoding skips timestamp tokens and does not
    condition one 30-second window on the previous one's text (which only matters for long
    recordings and is how Whisper loops)."""
    values: dict[str, Any] = {
        "language": voice.decode_language,
        "task": "transcribe",
        "beam_size": voice.beam_size,
        "best_of": max(1, voice.beam_size),
        "without_timestamps": True,
        "condition_on_previous_text": False,
        "vad_filter": voice.vad_filter,
    }
    if not voice.temperature_fallback:
        values["temperature"] = 0.0
    return values


@dataclass(frozen=True, slots=True)
class WhisperSpec:
    """What to load and how to run it: the voice section, and where models are kept."""

    voice: VoiceSettings = field(default_factory=VoiceSettings)
    download_root: Path | None = None
    #: The data directory whose ``doppelbot model download speech`` copy a size name or hub
    #: id loads from (None: faster-whisper fetches it from the hub into ``download_root``).
    data_dir: Path | None = None

    @property
    def name(self) -> str:
        """How transcripts name their model: the folder's name for a local model."""
        path = Path(self.voice.model).expanduser()
        return path.name if path.is_dir() else self.voice.model


def whisper_spec(settings: Settings) -> WhisperSpec:
    """The configured speech model (``settings.voice``) with the data directory's caches."""
    return WhisperSpec(settings.voice, settings.store.voice_cache_dir, settings.store.data_dir)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import ctranslate2

    try:
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except RuntimeError:  # no CUDA driver at all
        return "cpu"


def resolve_compute_type(device: str, compute_type: str) -> str:
    if compute_type != "auto":
        return compute_type
    return "float16" if device == "cuda" else "int8"


def cpu_threads(threads: int | None) -> int:
    return threads if threads else (os.cpu_count() or 1)


def load_whisper(spec: WhisperSpec) -> Any:
    """A ``faster_whisper.WhisperModel`` for ``spec``; ``SpeechModelError`` with one clear
    line when it cannot be loaded (missing files, offline without a local copy, bad folder)."""
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:  # pragma: no cover - a broken install
        raise SpeechModelError(f"faster-whisper is not installed: {exc}") from None
    device = resolve_device(spec.voice.device)
    compute_type = resolve_compute_type(device, spec.voice.compute_type)
    path = Path(spec.voice.model).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or spec.voice.model.startswith((".", "~"))):
        raise SpeechModelError(f"speech model folder not found: {path}")
    if not local and spec.data_dir is not None:
        # The bot starts offline: a size name or hub id loads the downloaded copy.

        try:
            path = Path(model_source(speech_repo(spec.voice.model), spec.data_dir, "speech"))
        except ModelMissingError as exc:
            raise SpeechModelError(str(exc)) from None
        local = True
    if local and not (path / "model.bin").is_file():
        raise SpeechModelError(
            f"{path} is not a CTranslate2 Whisper model (no model.bin); convert one with "
            "ct2-transformers-converter or use a faster-whisper size such as small"
        )
    try:
        return WhisperModel(
            str(path) if local else spec.voice.model,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads(spec.voice.threads) if device == "cpu" else 0,
            download_root=None if local or spec.download_root is None else str(spec.download_root),
        )
    except Exception as exc:
        hint = ""
        if not local:
            hint = (
                " (the first use downloads it from the Hugging Face hub; offline, point "
                "DOPPELBOT_VOICE_MODEL at a local folder)"
            )
        raise SpeechModelError(
            f"cannot load the speech model {spec.voice.model!r} on {device}/{compute_type}: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
