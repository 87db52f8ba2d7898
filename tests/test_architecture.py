"""Adapters at the edges: telethon only in doppelbot/telegram, ML libraries only in the
model/training/knowledge/speech modules, and a CLI that starts without either."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "doppelbot"
ML = {
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "sentence_transformers",
    "ctranslate2",
    "accelerate",
    "tokenizers",
    "safetensors",
    "onnxruntime",
    "trl",
    "faster_whisper",
    "av",
}
ML_ALLOWED = ("model", "knowledge", "training", "speech")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules() -> list[tuple[Path, set[str]]]:
    return [(p, _imports(p)) for p in sorted(PKG.rglob("*.py"))]


def test_telethon_only_in_telegram_adapter() -> None:
    offenders = [
        str(p.relative_to(PKG))
        for p, names in _modules()
        if "telethon" in names and p.relative_to(PKG).parts[0] != "telegram"
    ]
    assert offenders == []


def test_ml_libraries_only_in_model_modules() -> None:
    offenders = [
        f"{p.relative_to(PKG)}: {sorted(names & ML)}"
        for p, names in _modules()
        if names & ML and p.relative_to(PKG).parts[0] not in ML_ALLOWED
    ]
    assert offenders == []


def test_cli_import_is_light() -> None:
    code = (
        "import sys, doppelbot.cli, doppelbot.__main__;"
        "heavy = sorted(m for m in ('torch','transformers','telethon','peft',"
        "'sentence_transformers','bitsandbytes','faster_whisper','ctranslate2','av')"
        " if m in sys.modules);"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from doppelbot.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'CLEAN')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("CLEAN")


def test_no_environ_reads_outside_config() -> None:
    offenders = []
    for p in PKG.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        if ("os.environ" in text or "os.getenv" in text) and p.name != "config.py":
            offenders.append(str(p.relative_to(PKG)))
    assert offenders == []
