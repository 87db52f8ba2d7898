"""Tiny random Whisper models in faster-whisper's format, and short voice notes, for tests.

No real Whisper can be downloaded in tests, so ``make_whisper_dir`` builds a randomly
initialised ``WhisperForConditionalGeneration`` with a Whisper-layout tokenizer made here (byte
tokens, then ``<|endoftext|>``, ``<|startoftranscript|>``, the 99 language tokens, the task and
``<|notimestamps|>`` tokens at Whisper's relative positions; the converter appends the 1,501
timestamp tokens) and converts it with CTranslate2's own ``TransformersConverter`` — exactly the
kind of folder ``faster_whisper.WhisperModel`` loads, so the product's real loading code runs.
``scripts/bench_voice.py`` uses the same builder at a real size's exact shape (``SHAPES``).

``make_ogg_opus(seconds)`` encodes a short OGG/Opus note (a voice note's container and codec)
with PyAV; ``make_mp4_aac(seconds)`` a round-video-like MP4 with an AAC track.

Random weights give random text: assert on structure, never on wording.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

# Whisper's language tokens in their vocabulary order (multilingual models before large-v3).
_LANGUAGE_ORDER = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su"
)
LANGUAGES = tuple(_LANGUAGE_ORDER.split(" "))
SPECIAL_AFTER_LANGS = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
TIMESTAMPS = 1501

# The real models' shapes (random weights of these are what the benchmark times).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 384, "layers": 4, "heads": 6, "base_tokens": 50257},
    "base": {"d_model": 512, "layers": 6, "heads": 8, "base_tokens": 50257},
    "small": {"d_model": 768, "layers": 12, "heads": 12, "base_tokens": 50257},
    "medium": {"d_model": 1024, "layers": 24, "heads": 16, "base_tokens": 50257},
}
TINY = {"d_model": 64, "layers": 2, "heads": 2, "base_tokens": 50257}


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable character table (what ByteLevel pre-tokenisation emits)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    order = sorted(range(256), key=lambda i: bs[i])
    return [chr(cs[i]) for i in order]


def make_tokenizer(base_tokens: int = TINY["base_tokens"]) -> Any:
    """A byte-level BPE tokenizer in Whisper's layout: ``base_tokens`` ordinary tokens (the 256
    bytes, then fillers), then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if base_tokens < 256:
        raise ValueError("base_tokens must cover the 256 byte tokens")
    vocab = {ch: i for i, ch in enumerate(_byte_chars())}
    for i in range(256, base_tokens - 1):
        vocab[f"tok{i}"] = i
    # Multilingual Whisper vocabularies hold an empty token just before <|endoftext|>;
    # CTranslate2 tells a multilingual model by it.
    vocab[""] = base_tokens - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGES),
        *SPECIAL_AFTER_LANGS,
    ]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def make_whisper_dir(
    path: Path,
    *,
    shape: dict[str, int] | None = None,
    quantization: str = "int8",
    seed: int = 0,
) -> Path:
    """``path`` becomes a CTranslate2 Whisper folder (model.bin, config.json, vocabulary,
    tokenizer.json, preprocessor_config.json) of random weights of ``shape`` (default: tiny)."""
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import GenerationConfig, PreTrainedTokenizerFast, WhisperConfig
    from transformers import WhisperForConditionalGeneration as Whisper

    s = {**TINY, **(shape or {})}
    tok = make_tokenizer(s["base_tokens"])
    n_text = tok.get_vocab_size()
    eot = s["base_tokens"]
    ids = {t: tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")}
    config = WhisperConfig(
        vocab_size=n_text + TIMESTAMPS,
        num_mel_bins=80,
        d_model=s["d_model"],
        encoder_layers=s["layers"],
        decoder_layers=s["layers"],
        encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"],
        encoder_ffn_dim=4 * s["d_model"],
        decoder_ffn_dim=4 * s["d_model"],
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(seed)
    model = Whisper(config).eval()
    lang_to_id = {f"<|{code}|>": tok.token_to_id(f"<|{code}|>") for code in LANGUAGES}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
        lang_to_id=lang_to_id,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        alignment_heads=[[s["layers"] - 1, 0]],
    )
    with tempfile.TemporaryDirectory(prefix="tiny-whisper-hf-") as tmp:
        hf = Path(tmp)
        model.save_pretrained(hf)
        tok.save(str(hf / "tokenizer.json"))
        PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        ).save_pretrained(hf)
        tok.save(str(hf / "tokenizer.json"))  # the plain file faster-whisper reads
        (hf / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "feature_size": 80,
                    "sampling_rate": 16000,
                    "hop_length": 160,
                    "chunk_length": 30,
                    "n_fft": 400,
                }
            ),
            encoding="utf-8",
        )
        if path.exists():
            shutil.rmtree(path)
        TransformersConverter(
            str(hf), copy_files=["tokenizer.json", "preprocessor_config.json"]
        ).convert(str(path), quantization=quantization)
    return path


def _encode(fmt: str, codec: str, rate: int, seconds: float, freq: float) -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        n = int(seconds * rate)
        t = np.arange(n, dtype=np.float32) / rate
        # a warbling tone with some noise: enough structure for the encoder, no speech
        wave = 0.3 * np.sin(2 * np.pi * freq * t * (1 + 0.1 * np.sin(2 * np.pi * 3 * t)))
        wave += 0.02 * np.random.default_rng(0).standard_normal(n)
        pcm = (wave * 32767).astype(np.int16)
        step = 960
        for start in range(0, n, step):
            chunk = pcm[start : start + step]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def make_ogg_opus(seconds: float = 2.0, *, freq: float = 220.0) -> bytes:
    """An OGG/Opus voice note of ``seconds`` (48 kHz mono, what Telegram's apps record)."""
    return _encode("ogg", "libopus", 48000, seconds, freq)


def make_mp4_aac(seconds: float = 2.0, *, freq: float = 330.0) -> bytes:
    """An MP4 with one AAC audio track (the audio of a round video note)."""
    return _encode("mp4", "aac", 44100, seconds, freq)
