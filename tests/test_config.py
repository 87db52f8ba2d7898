from __future__ import annotations

import ast
import subprocess
import sys
import types
import typing
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import AfterValidator, BeforeValidator, SecretStr

from doppelbot import config
from doppelbot.config import (
    ModelSettings,
    ResponderSettings,
    SettingField,
    Settings,
    default_of,
    load_settings,
    setting_fields,
)
from doppelbot.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "doppelbot"


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env_file=None, data_dir=tmp_path)
    assert s.model.base == "ai-forever/FRED-T5-1.7B"
    assert s.model.precision == "auto"  # int8 on the CPU, bf16 on a GPU with room
    assert s.model.max_input_tokens == 712
    assert s.store.db_path.parent == tmp_path
    assert s.responder.reply_mode == "review"
    assert s.generation.temperature == 0.8
    assert s.generation.top_p == 0.85
    assert s.responder.catch_up_max_age_s == 6 * 3600  # "6h"
    assert s == Settings(store=s.store)  # nothing but the data dir differs from the defaults


def test_env_beats_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("DOPPELBOT_DEBOUNCE_S=7\nDOPPELBOT_PERSONA=из файла\n", encoding="utf-8")
    s = load_settings(env_file=env)
    assert s.responder.debounce_s == 7 and s.prompt.persona == "из файла"
    monkeypatch.setenv("DOPPELBOT_DEBOUNCE_S", "9")
    s = load_settings(env_file=env)
    assert s.responder.debounce_s == 9 and s.prompt.persona == "из файла"


def test_lists_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPPELBOT_ALLOW_LIST", "123, @alice ,")
    monkeypatch.setenv("DOPPELBOT_LORA_TARGETS", '["q","k","v"]')
    s = load_settings(env_file=None)
    assert s.responder.allow_list == ("123", "@alice")
    assert s.responder.allow_ids == {123} and s.responder.allow_usernames == {"alice"}
    assert s.train.lora_targets == ("q", "k", "v")


# --- every variable lands in its section -------------------------------------------------------
_SPECIAL = {  # values for the field types that parse text
    config._quiet_hours: ("22:00-07:30", "22:00-07:30"),
    config._time_zone: ("Europe/Moscow", "Europe/Moscow"),
    config._voice_compute_type: ("INT8_float32", "int8_float32"),
    config._language: ("EN", "en"),
    config.parse_duration: ("1h30m", 5400.0),
}


def _bounds_allow(f: SettingField, value: float) -> bool:
    for m in f.info.metadata:
        if (
            (isinstance(m, Ge) and value < m.ge)
            or (isinstance(m, Gt) and value <= m.gt)
            or (isinstance(m, Le) and value > m.le)
            or (isinstance(m, Lt) and value >= m.lt)
        ):
            return False
    return True


def _non_default(f: SettingField) -> tuple[str, Any]:
    """A valid value other than the default, as environment text and as parsed, generated
    from the field's type and bounds."""
    for m in f.info.metadata:
        if isinstance(m, AfterValidator | BeforeValidator) and m.func in _SPECIAL:
            return _SPECIAL[m.func]
    default = f.info.get_default(call_default_factory=True)
    kind = f.info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        choice = next(c for c in typing.get_args(kind) if c != default)
        return str(choice), choice
    if kind is bool:
        return ("false", False) if default else ("true", True)
    if kind in (int, float):
        base = default if isinstance(default, int | float) else 1
        candidates = [base + 1, base - 1, base * 2, base / 2, 7, 3, 0.5, 0]
        for value in candidates:
            value = kind(value)
            if value != default and _bounds_allow(f, value):
                return str(value), value
    if kind is SecretStr:
        return "s3cret", SecretStr("s3cret")
    if kind is Path:
        return "/tmp/doppelbot-elsewhere", Path("/tmp/doppelbot-elsewhere")
    if typing.get_origin(kind) is tuple:
        return "a, b", ("a", "b")
    if kind is str:
        return "другое значение", "другое значение"
    raise AssertionError(f"no value for {f.env} ({f.info.annotation})")


@pytest.mark.parametrize("field", setting_fields(), ids=lambda f: f.env)
def test_every_variable_lands_in_its_section_field(
    field: SettingField, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, parsed = _non_default(field)
    defaults = load_settings(env_file=None)
    monkeypatch.setenv(field.env, text)
    s = load_settings(env_file=None)
    assert field.value(s) == parsed != field.value(defaults)
    section = getattr(s, field.section)
    assert getattr(section, field.name) == parsed
    # nothing else changed
    assert s == defaults.model_copy(
        update={field.section: replace(getattr(defaults, field.section), **{field.name: parsed})}
    )


def test_the_table_is_every_section_field() -> None:
    table = {(f.section, f.name) for f in setting_fields()}
    assert len(table) == len(setting_fields()) == len({f.env for f in setting_fields()})
    for section, kind in config.section_types().items():
        for name, info in kind.__pydantic_fields__.items():  # type: ignore[attr-defined]
            not_a_setting = (info.json_schema_extra or {}).get("env", "") is None
            assert ((section, name) in table) is not not_a_setting, (section, name)
    # names that moved into a section keep their variable
    envs = {f.env: (f.section, f.name) for f in setting_fields()}
    assert envs["DOPPELBOT_MODEL"] == ("model", "base")
    assert envs["DOPPELBOT_MAX_INPUT_TOKENS"] == ("model", "max_input_tokens")
    assert envs["DOPPELBOT_VOICE_MODEL"] == ("voice", "model")
    assert envs["DOPPELBOT_LEARNING_RATE"] == ("train", "lr")
    assert envs["DOPPELBOT_CATCH_UP_MAX_AGE"] == ("responder", "catch_up_max_age_s")
    assert envs["DOPPELBOT_DATASET_VOICE"] == ("dataset", "voice_transcripts")


def test_flat_overrides_win_and_typos_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOPPELBOT_DEBOUNCE_S", "9")
    s = load_settings(
        env_file=None,
        data_dir=tmp_path,
        debounce_s=0.05,
        voice_model="tiny",
        max_input_tokens=300,
        catch_up_max_age="90m",
        allow_list="@ann,5",
    )
    assert s.store.data_dir == tmp_path and s.responder.debounce_s == 0.05
    assert s.voice.model == "tiny" and s.model.max_input_tokens == 300
    assert s.responder.catch_up_max_age_s == 5400 and s.responder.allow_list == ("@ann", "5")
    with pytest.raises(TypeError, match="debounce"):
        load_settings(env_file=None, debounce=1.0)


def test_sections_are_frozen_and_check_their_values() -> None:
    s = Settings()
    with pytest.raises(FrozenInstanceError):
        s.responder.debounce_s = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="human_delay_max_s"):
        replace(s.responder, human_delay_min_s=9.0)
    with pytest.raises(ValueError, match="greater than or equal to 16"):
        ModelSettings(max_input_tokens=8)
    assert s.prompt.format is s.prompt.format  # built once
    assert ResponderSettings(timezone="UTC").tz is not None


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("DOPPELBOT_TOP_P", "1.5", "DOPPELBOT_TOP_P: Input should be less than or equal to 1"),
        ("DOPPELBOT_API_ID", "abc", "DOPPELBOT_API_ID"),
        ("DOPPELBOT_PRECISION", "int4", "DOPPELBOT_PRECISION"),
        ("DOPPELBOT_QUIET_HOURS", "late", "DOPPELBOT_QUIET_HOURS: expected HH:MM-HH:MM"),
        ("DOPPELBOT_TIMEZONE", "Mars/Base", "DOPPELBOT_TIMEZONE"),
        ("DOPPELBOT_CATCH_UP_MAX_AGE", "soon", "DOPPELBOT_CATCH_UP_MAX_AGE: not a duration"),
        ("DOPPELBOT_MAX_INPUT_TOKENS", "8", "DOPPELBOT_MAX_INPUT_TOKENS"),
        ("DOPPELBOT_VOICE_LANGUAGE", "russian", "DOPPELBOT_VOICE_LANGUAGE"),
        ("DOPPELBOT_LEARNING_RATE", "-1", "DOPPELBOT_LEARNING_RATE"),
        ("DOPPELBOT_ALLOW_LIST", "[1,", "DOPPELBOT_ALLOW_LIST: Expecting value"),
        ("DOPPELBOT_HUMAN_DELAY_MIN_S", "9", "settings: human_delay_max_s must be >="),
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


def test_config_show_names_every_variable(tmp_path: Path) -> None:
    env = {
        "DOPPELBOT_DATA_DIR": str(tmp_path),
        "DOPPELBOT_API_HASH": "not-to-be-shown",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "COLUMNS": "250",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "doppelbot", "--env-file", "/dev/null", "config", "show"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for f in setting_fields():
        assert f.env in proc.stdout
    assert "not-to-be-shown" not in proc.stdout and "********" in proc.stdout


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


def test_env_example_is_grouped_and_complete() -> None:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    for section in config.section_types():
        assert f"# --- {section}: " in text
    for f in setting_fields():
        assert f"{f.env}=" in text


def test_env_example_loads(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text(encoding="utf-8"), encoding="utf-8")
    defaults = load_settings(env_file=None, data_dir=tmp_path)
    from_file = load_settings(env_file=env, data_dir=tmp_path)
    assert from_file == defaults


def _float_fields() -> list[SettingField]:
    return [f for f in setting_fields() if "float" in str(f.info.annotation)]


def test_every_float_setting_refuses_non_finite_values(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {f.key for f in _float_fields()}
    assert {"debounce_s", "temperature", "generation_timeout_s", "catch_up_max_age"} <= names
    for f in _float_fields():
        for value in ("inf", "-inf", "nan", "Infinity"):
            with monkeypatch.context() as patch:
                patch.setenv(f.env, value)
                with pytest.raises(ConfigError, match=f"{f.env}: .*finite"):
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
    # a renamed field is known by its variable, not by its name in the section
    assert unknown_settings(None, environ={"DOPPELBOT_VOICE_MODEL": "tiny"}) == []
    (line,) = unknown_settings(None, environ={"DOPPELBOT_BASE": "x"})
    assert "DOPPELBOT_BASE (environment) is not a doppelbot setting" in line


# --- each default is written once --------------------------------------------------------------
def _literal_defaults_outside_config() -> list[str]:
    """Places outside ``config.py`` that give a setting's name its default as a literal (a
    dataclass field or a parameter default): a second copy that would drift."""
    defaults: dict[str, set[object]] = {}
    for f in setting_fields():
        value = f.info.get_default(call_default_factory=True)
        if isinstance(value, int | float) and not isinstance(value, bool) and value not in (0, 1):
            for name in {f.name, f.key}:
                defaults.setdefault(name, set()).add(value)
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "config.py":
            continue
        where = path.relative_to(ROOT)

        def check(name: str, node: ast.expr | None, line: int, where: Path = where) -> None:
            if isinstance(node, ast.Constant) and node.value in defaults.get(name, ()):
                found.append(f"{where}:{line}: {name} = {node.value!r}")

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                check(node.target.id, node.value, node.lineno)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = [*node.args.posonlyargs, *node.args.args]
                for arg, default in zip(
                    args[len(args) - len(node.args.defaults) :], node.args.defaults, strict=True
                ):
                    check(arg.arg, default, node.lineno)
                for arg, kw_default in zip(
                    node.args.kwonlyargs, node.args.kw_defaults, strict=True
                ):
                    check(arg.arg, kw_default, node.lineno)
    return sorted(found)


def test_each_default_is_written_once() -> None:
    assert _literal_defaults_outside_config() == []
    budget = default_of(ModelSettings, "max_input_tokens")
    literal = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == budget and type(node.value) is int
    ]
    assert literal == ["doppelbot/config.py:" + literal[0].split(":")[1]], literal
    # the options objects that name the budget take it from the section
    from doppelbot.dataset.options import DatasetOptions
    from doppelbot.model.loader import ReplyModel
    from doppelbot.training.types import TrainOptions

    assert DatasetOptions().max_input_tokens == TrainOptions().model.max_input_tokens == budget
    assert ReplyModel.__dataclass_fields__["max_input_tokens"].default == budget


def test_the_default_check_finds_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "doppelbot"
    (fake / "sub").mkdir(parents=True)
    (fake / "sub" / "copy.py").write_text(
        "class X:\n    max_input_tokens: int = 712\n\ndef f(*, debounce_s=5.0): ...\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _literal_defaults_outside_config() == [
        "doppelbot/sub/copy.py:2: max_input_tokens = 712",
        "doppelbot/sub/copy.py:4: debounce_s = 5.0",
    ]
