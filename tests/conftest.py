"""Shared fixtures. Tests never touch the network: HF hubs are forced offline here."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from doppelbot.config import Settings, load_settings
from doppelbot.store.database import Database

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "fred-t5-tokenizer"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own DOPPELBOT_* variables must not leak into tests."""
    for key in list(os.environ):
        if key.startswith("DOPPELBOT_"):
            monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env_file=None, data_dir=tmp_path / "data")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "test.sqlite3")
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper in faster-whisper's format (built once per session)."""
    from tests.tiny_whisper import make_whisper_dir

    return make_whisper_dir(tmp_path_factory.mktemp("speech") / "tiny-whisper")


@pytest.fixture(scope="session")
def voice_ogg() -> bytes:
    """A 2-second OGG/Opus voice note."""
    from tests.tiny_whisper import make_ogg_opus

    return make_ogg_opus(2.0)


@pytest.fixture
def voice_settings(tmp_path: Path, whisper_dir: Path) -> Settings:
    """Settings whose speech model is the tiny one, decoding in one greedy pass."""
    return load_settings(
        env_file=None,
        data_dir=tmp_path / "data",
        voice_model=str(whisper_dir),
        voice_temperature_fallback=False,
        voice_vad_filter=False,
        voice_threads=2,
    )
