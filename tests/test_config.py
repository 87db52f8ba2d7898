from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from doppelbot.config import load_settings
from doppelbot.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env_file=None, data_dir=tmp_path)
    assert s.model == "ai-forever/FRED-T5-1.7B"
    assert s.precision == "auto"  # int8 on the CPU, bf16 on a GPU with room
    assert s.db_path.parent == tmp_path
    assert s.reply_mode == "review"
    assert s.generation_options().temperature == 0.8
    assert s.generation_options().top_p == 0.85


def test_env_beats_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("DOPPELBOT_DEBOUNCE_S=7\nDOPPELBOT_PERSONA=из файла\n", encoding="utf-8")
    s = load_settings(env_file=env)
    assert s.debounce_s == 7 and s.persona == "из файла"
    monkeypatch.setenv("DOPPELBOT_DEBOUNCE_S", "9")
    s = load_settings(env_file=env)
    assert s.debounce_s == 9 and s.persona == "из файла"


def test_lists_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPPELBOT_ALLOW_LIST", "123, @alice ,")
    monkeypatch.setenv("DOPPELBOT_LORA_TARGETS", '["q","k","v"]')
    s = load_settings(env_file=None)
    assert s.allow_list == ["123", "@alice"]
    assert s.lora_targets == ["q", "k", "v"]


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("DOPPELBOT_TOP_P", "1.5", "DOPPELBOT_TOP_P"),
        ("DOPPELBOT_API_ID", "abc", "DOPPELBOT_API_ID"),
        ("DOPPELBOT_PRECISION", "int4", "DOPPELBOT_PRECISION"),
        ("DOPPELBOT_QUIET_HOURS", "late", "DOPPELBOT_QUIET_HOURS"),
        ("DOPPELBOT_TIMEZONE", "Mars/Base", "DOPPELBOT_TIMEZONE"),
    ],
)
def test_bad_value_one_line(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings(env_file=None)
    text = str(err.value)
    assert text.startswith(needle) and "\n" not in text


def test_bad_value_cli_exit(tmp_path: Path) -> None:
    env = {"DOPPELBOT_TOP_K": "-3", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "doppelbot", "config", "show"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: DOPPELBOT_TOP_K: Input should be greater than or equal to 0"
    ]
    assert "Traceback" not in proc.stderr


def test_env_example_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_env_example.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert (ROOT / ".env.example").read_text(encoding="utf-8") == proc.stdout, (
        "run: python scripts/gen_env_example.py > .env.example"
    )


def test_env_example_loads(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text(encoding="utf-8"), encoding="utf-8")
    defaults = load_settings(env_file=None, data_dir=tmp_path)
    from_file = load_settings(env_file=env, data_dir=tmp_path)
    assert from_file == defaults


def _float_fields() -> list[str]:
    from doppelbot.config import Settings

    return [
        name
        for name, info in Settings.model_fields.items()
        if "float" in str(info.annotation) and "list" not in str(info.annotation)
    ]


def test_every_float_setting_refuses_non_finite_values(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _float_fields()
    assert {"debounce_s", "temperature", "generation_timeout_s"} <= set(names)
    for name in names:
        for value in ("inf", "-inf", "nan", "Infinity"):
            with monkeypatch.context() as patch:
                patch.setenv(f"DOPPELBOT_{name.upper()}", value)
                with pytest.raises(ConfigError, match=f"DOPPELBOT_{name.upper()}: .*finite"):
                    load_settings(env_file=None)


def test_unknown_variables_are_named_with_the_closest_setting(tmp_path: Path) -> None:
    from doppelbot.config import unknown_settings

    env = tmp_path / ".env"
    env.write_text(
        "DOPPELBOT_TOPP=0.5\nDOPPELBOT_TOP_K=3\nREPLY_MODE=auto\nOTHER_TOOL=1\n", encoding="utf-8"
    )
    lines = unknown_settings(
        env,
        environ={"DOPPELBOT_DENYLIST": "@boss", "DOPPELBOT_ZZZZZZ": "1", "PATH": "/bin"},
    )
    text = "\n".join(lines)
    assert "DOPPELBOT_DENYLIST (environment) is not a doppelbot setting" in text
    assert "did you mean DOPPELBOT_DENY_LIST?" in text
    assert f"DOPPELBOT_TOPP ({env}) is not a doppelbot setting" in text
    assert "did you mean DOPPELBOT_TOP_P?" in text
    assert "DOPPELBOT_ZZZZZZ (environment)" in text and "see .env.example" in text
    assert f"REPLY_MODE in {env} is ignored: settings need the prefix" in text
    assert "TOP_K" not in text and "OTHER_TOOL" not in text and "PATH" not in text
    assert len(lines) == 4
    assert unknown_settings(None, environ={"doppelbot_top_p": "0.5"}) == []  # case-insensitive
