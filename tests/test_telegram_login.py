"""`doppelbot login`, the client factory and the CLI commands around the export, on the real
Telethon client wired to the fake Telegram (only the MTProto sender is replaced)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from telethon import TelegramClient
from telethon.sessions import StringSession
from typer.testing import CliRunner

from doppelbot.cli import app, main
from doppelbot.config import Settings, load_settings
from doppelbot.core.errors import ConfigError, NotLoggedInError, TelegramError
from doppelbot.store import history
from doppelbot.store.database import Database
from doppelbot.telegram import client as client_mod
from doppelbot.telegram.login import LoginPrompts, login_interactive
from tests.faketg import API_HASH, API_ID, OWNER_ID, FakeTelegram


@pytest.fixture
def tg_settings(tmp_path: Path) -> Settings:
    return load_settings(
        env_file=None, data_dir=tmp_path / "data", api_id=API_ID, api_hash=API_HASH
    )


def _wire(monkeypatch: pytest.MonkeyPatch, tg: FakeTelegram, *, authorized: bool) -> list[Any]:
    """Every client doppelbot builds talks to ``tg`` instead of the network."""
    real = client_mod.create_client
    made: list[Any] = []

    def create(settings: Settings, **kwargs: Any) -> TelegramClient:
        client = real(settings, **kwargs)
        tg.install(client, authorized=authorized)
        made.append(client)
        return client

    monkeypatch.setattr(client_mod, "create_client", create)
    return made


def _prompts(answers: dict[str, list[str]], asked: list[str]) -> LoginPrompts:
    def ask(kind: str) -> Any:
        def f() -> str:
            asked.append(kind)
            return answers[kind].pop(0)

        return f

    return LoginPrompts(ask("phone"), ask("code"), ask("password"), lambda text: asked.append(text))


def test_session_file_is_created_0600_before_telethon(tg_settings: Settings) -> None:
    client = client_mod.create_client(tg_settings)
    try:
        path = tg_settings.session_path
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert client.flood_sleep_threshold == 0
    finally:
        client.session.close()
    os.chmod(path, 0o644)  # a loose file from elsewhere is tightened on next use
    client_mod.create_client(tg_settings).session.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_credentials_and_bad_session_string(tmp_path: Path) -> None:
    bare = load_settings(env_file=None, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="DOPPELBOT_API_ID"):
        client_mod.create_client(bare)
    bad = load_settings(
        env_file=None, data_dir=tmp_path, api_id=1, api_hash="x", session_string="nonsense"
    )
    with pytest.raises(ConfigError, match="SESSION_STRING"):
        client_mod.create_client(bad)


async def test_login_with_code_and_2fa_saves_the_session_file(
    tg_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tg = FakeTelegram()
    tg.password = "correct horse"
    _wire(monkeypatch, tg, authorized=False)
    asked: list[str] = []
    answers = {
        "phone": ["+70000000000"],
        "code": ["00000", tg.login_code],
        "password": ["nope", "correct horse"],
    }
    result = await login_interactive(tg_settings, _prompts(answers, asked))
    assert not result.already and result.account.user_id == OWNER_ID
    assert result.session_string is None
    assert asked.count("code") == 2 and asked.count("password") == 2
    assert any("code is not right" in a for a in asked)
    # The session file now holds an authorised login: a new client is logged in at once.
    again = await login_interactive(tg_settings, _prompts({}, []))
    assert again.already and again.account.user_id == OWNER_ID
    assert stat.S_IMODE(tg_settings.session_path.stat().st_mode) == 0o600
    assert "correct horse" not in caplog.text and tg.login_code not in caplog.text


async def test_login_failures_are_typed(
    tg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    tg = FakeTelegram()
    _wire(monkeypatch, tg, authorized=False)
    answers = {"phone": ["+70000000000"], "code": ["1", "2", "3"], "password": []}
    with pytest.raises(TelegramError, match="code is wrong"):
        await login_interactive(tg_settings, _prompts(answers, []))
    with pytest.raises(TelegramError, match="phone number"):
        await login_interactive(tg_settings, _prompts({"phone": ["+1555"], "code": []}, []))


async def test_connected_refuses_a_session_that_is_not_logged_in(
    tg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wire(monkeypatch, FakeTelegram(), authorized=False)
    with pytest.raises(NotLoggedInError, match="doppelbot login"):
        async with client_mod.connected(tg_settings):
            pass


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    monkeypatch.setenv("DOPPELBOT_API_ID", str(API_ID))
    monkeypatch.setenv("DOPPELBOT_API_HASH", API_HASH)
    return ["--env-file", "/dev/null", "--data-dir", str(tmp_path / "data")]


def test_cli_login_print_session_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tg = FakeTelegram()
    _wire(monkeypatch, tg, authorized=False)
    args = _env(monkeypatch, tmp_path)
    result = CliRunner().invoke(
        app, [*args, "login", "--print-session-string"], input=f"+70000000000\n{tg.login_code}\n"
    )
    assert result.exit_code == 0, result.output
    string = result.stdout.strip().splitlines()[-1]
    session = StringSession(string)  # a valid Telethon StringSession…
    assert session.auth_key is not None and session.auth_key.key in tg._authorized  # …logged in
    assert not (tmp_path / "data" / "doppelbot.session").exists()  # no file was written
    assert "Logged in as Owner (@owner)" in result.stderr


async def test_cli_export_end_to_end_with_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tg = FakeTelegram()
    alice = tg.add_user("Alice", username="alice")
    tg.add_history(alice, 260)
    tg.add_history(tg.add_user("Robot", bot=True), 3)
    _wire(monkeypatch, tg, authorized=True)
    args = _env(monkeypatch, tmp_path)
    import asyncio

    await asyncio.to_thread(main, [*args, "export", "--batch-size", "50"])
    out = capsys.readouterr().out
    assert "Export summary" in out and "Alice" in out and "complete" in out
    assert "260 new messages from 1 chats" in out and "skipped: 1 bots" in out
    db = await Database.open(tmp_path / "data" / "doppelbot.sqlite3")
    try:
        assert await history.count_messages(db, alice.id) == 260
    finally:
        await db.close()
    session = tmp_path / "data" / "doppelbot.session"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600


def test_cli_export_when_not_logged_in_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _wire(monkeypatch, FakeTelegram(), authorized=False)
    with pytest.raises(SystemExit) as info:
        main([*_env(monkeypatch, tmp_path), "export"])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().startswith("error: not logged in to Telegram")


def test_cli_help_explains_export_and_import_options() -> None:
    runner = CliRunner()
    text = runner.invoke(app, ["export", "--help"], terminal_width=200).output
    for option in (
        "--groups",
        "--channels",
        "--saved",
        "--chat",
        "--since",
        "--replied-only",
        "--takeout",
        "--batch-size",
        "--refetch-recent",
    ):
        assert option in text
    text = runner.invoke(app, ["import", "--help"], terminal_width=200).output
    for option in ("--groups", "--channels", "--saved", "--bots", "--owner-id", "result.json"):
        assert option in text


def test_telethon_errors_translate_to_one_clear_line() -> None:
    from telethon import errors as tg_errors
    from telethon.tl import functions

    from doppelbot.core.errors import FloodWaitTooLongError, TakeoutDelayError
    from doppelbot.telegram.errors import translate

    req = functions.messages.GetHistoryRequest(
        peer=None, offset_id=0, offset_date=None, add_offset=0, limit=1, max_id=0, min_id=0, hash=0
    )
    delay = translate(tg_errors.TakeoutInitDelayError(request=None, capture=7200))
    assert isinstance(delay, TakeoutDelayError) and "Allow" in str(delay) and "2.0 h" in str(delay)
    flood = translate(tg_errors.FloodWaitError(request=req, capture=90), flood_bound=60)
    assert (
        isinstance(flood, FloodWaitTooLongError)
        and "90s" in str(flood)
        and "GetHistory" in str(flood)
    )
    gone = translate(tg_errors.AuthKeyUnregisteredError(request=req))
    assert isinstance(gone, NotLoggedInError) and "doppelbot login" in str(gone)
    other = translate(tg_errors.RPCError(request=req, message="CHAT_ADMIN_REQUIRED", code=400))
    assert str(other) == "Telegram refused GetHistory: CHAT_ADMIN_REQUIRED (code 400)"
    assert "cannot reach Telegram" in str(translate(ConnectionError("reset")))


async def test_string_session_from_settings_needs_no_file(tmp_path: Path) -> None:
    tg = FakeTelegram()
    settings = load_settings(
        env_file=None,
        data_dir=tmp_path / "data",
        api_id=API_ID,
        api_hash=API_HASH,
        session_string=tg.session_string(),
    )
    client = client_mod.create_client(settings, receive_updates=False)
    assert isinstance(client.session, StringSession)
    tg.install(client)  # keeps the session's own (already authorised) auth key
    async with client_mod.connected(settings, client=client) as connected_client:
        assert (await connected_client.get_me()).id == OWNER_ID
    assert not settings.session_path.exists()
