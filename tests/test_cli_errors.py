"""Every way a newcomer can call doppelbot wrong ends in one line (or click's short usage block)
and a non-zero exit — never a traceback without ``--debug``.

The table runs through ``doppelbot.cli.main`` (the console script's entry point) in-process; a
few rows run again through ``python -m doppelbot`` in a subprocess, where a traceback printed by
a thread (not only the main one) would show too. Odd networks (a server that does not speak
MTProto) and a read-only data directory have their own tests below.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from doppelbot.cli import main

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 5


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    says: str  # a fragment the message must contain
    code: int | None = None  # None: any non-zero exit
    env: dict[str, str] = field(default_factory=dict)
    seconds: float = 10.0  # fails within this long (the missing-model rows: no hub retries)


def _chat(**messages: object) -> dict[str, object]:
    return {"name": "Alice", "type": "personal_chat", "id": 1000, "messages": [messages]}


def _files(root: Path) -> dict[str, Path]:
    """Bad inputs a newcomer may hand to `import`."""
    root.mkdir(parents=True, exist_ok=True)
    ok = {"id": 1, "type": "message", "date_unixtime": "1682935200", "from_id": "user1000"}
    files = {
        "html": "<!DOCTYPE html>\n<html><head><title>Exported Data</title></head></html>",
        "bigint": json.dumps(_chat(**{**ok, "id": 2**64})),
        "bigsender": json.dumps(_chat(**{**ok, "from_id": f"user{2**70}"})),
        "infinity": json.dumps(_chat(**ok)).replace('"1682935200"', "Infinity"),
        "hugefloat": json.dumps(_chat(**ok)).replace('"1682935200"', "1e400"),
        "nested": "[" * 200_000 + "]" * 200_000,
        "truncated": json.dumps(_chat(**ok))[:-7],
        "notutf8": "",
    }
    paths = {}
    for name, text in files.items():
        path = root / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        paths[name] = path
    paths["notutf8"].write_bytes(b'{"name": "\xff\xfe"}')
    html_folder = root / "html-export"
    html_folder.mkdir()
    (html_folder / "messages.html").write_text("<html></html>", encoding="utf-8")
    paths["htmlfolder"] = html_folder
    return paths


def _cases(files: dict[str, Path]) -> list[Case]:
    usage = [
        Case(("nonexistent",), "No such command", 2),
        Case(("import",), "Missing argument", 2),
        Case(("train", "--batch-size", "0"), "--batch-size", 2),
        Case(("status", "--last", "abc"), "--last", 2),
        Case(("status", "--pause", "--resume"), "exclude each other", 2),
        Case(("export", "--since", "yesterday"), "not a date", 2),
        Case(("model", "download", "everything"), "choose model, embedder or speech", 2),
        Case(("facts", "remove"), "Missing argument", 2),
        Case(("--data-dir",), "requires an argument", 2),
    ]
    settings = [
        Case(("--env-file", "/missing/.env", "status"), "no such file", 2),
        Case(
            ("status",),
            "DOPPELBOT_DEBOUNCE_S: Input should be a finite number",
            2,
            {"DOPPELBOT_DEBOUNCE_S": "inf"},
        ),
        Case(("status",), "DOPPELBOT_TEMPERATURE", 2, {"DOPPELBOT_TEMPERATURE": "nan"}),
        Case(("login",), "DOPPELBOT_API_ID and DOPPELBOT_API_HASH are required", 2),
    ]
    imports = [
        Case(("import", str(files["html"])), "HTML export", 1),
        Case(("import", str(files["htmlfolder"])), "HTML export", 1),
        Case(("import", str(files["bigint"])), "out of range for a Telegram id", 1),
        Case(("import", str(files["bigsender"])), "out of range for a Telegram id", 1),
        Case(("import", str(files["infinity"])), "Infinity is not a JSON number", 1),
        Case(("import", str(files["hugefloat"])), "not a number", 1),
        Case(("import", str(files["nested"])), "nested too deeply", 1),
        Case(("import", str(files["truncated"])), "truncated", 1),
        Case(("import", str(files["notutf8"])), "not UTF-8", 1),
        Case(("import", str(files["html"].parent / "missing.json")), "no Telegram Desktop", 1),
    ]
    # No model downloaded: each fails at once and names the command that fixes it.
    missing = [
        Case(("chat",), "doppelbot model download"),
        Case(("train", "--dry-run"), "doppelbot model download"),
        Case(("eval", "base"), "doppelbot model download"),
        Case(("model", "check"), "doppelbot model download"),
        Case(("dataset", "--name", "x"), "doppelbot model download"),
        Case(("train", "--model", "./no/such/folder"), "no such folder"),
    ]
    return usage + settings + imports + missing


def _assert_one_line(out: str, err: str, code: int, case: Case, elapsed: float) -> None:
    text = out + err
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    assert len(lines) <= MAX_LINES, text
    assert code != 0, text
    if case.code is not None:
        assert code == case.code, text
    assert case.says in " ".join(text.split()), text
    assert elapsed < case.seconds, f"{case.args} took {elapsed:.1f}s"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A data dir with a dataset (so `eval`/`model check`/`train` get as far as the model)."""
    from doppelbot.core.domain import Role, Sample, Turn
    from doppelbot.dataset import jsonl

    root = tmp_path_factory.mktemp("errors")
    data = root / "data"
    sample = Sample(
        chat_id=1,
        context=(Turn(Role.OTHER, "привет"),),
        reply="привет",
        reply_date=1,
        context_start_date=1,
        source_message_ids=(1,),
        reply_message_ids=(2,),
        model_input="<SC1>Собеседник: привет\nЯ: <extra_id_0>",
        model_target="<extra_id_0>привет",
    )
    folder = data / "datasets" / "d1"
    folder.mkdir(parents=True)
    jsonl.write_samples(folder / jsonl.TRAIN_FILE, [sample] * 4)
    jsonl.write_samples(folder / jsonl.VALIDATION_FILE, [sample] * 2)
    jsonl.set_latest(data / "datasets", "d1")
    return data, _files(root / "files")


def test_bad_invocations_are_one_line(
    world: tuple[Path, dict[str, Path]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, files = world
    failures = []
    for case in _cases(files):
        with monkeypatch.context() as patch:
            for key, value in case.env.items():
                patch.setenv(key, value)
            args = ["--env-file", "/dev/null", "--data-dir", str(data), *case.args]
            if case.args[0].startswith("--"):  # a broken global option: nothing after it
                args = list(case.args)
            started = time.monotonic()
            try:
                main(args)
            except SystemExit as exc:
                code = int(exc.code or 0)
            else:
                code = 0
            elapsed = time.monotonic() - started
            captured = capsys.readouterr()
        try:
            _assert_one_line(captured.out, captured.err, code, case, elapsed)
        except AssertionError as exc:
            failures.append(f"{' '.join(case.args)} → exit {code}: {exc}")
    assert not failures, "\n\n".join(failures)


def _python_m(args: list[str], cwd: Path, **env: str) -> tuple[int, str, str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOPPELBOT_")}
    clean.update(PYTHONPATH=str(REPO), COLUMNS="100", **env)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "doppelbot", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean,
        timeout=120,
    )
    return out.returncode, out.stdout, out.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    "case",
    [
        Case(("nonexistent",), "No such command", 2),
        Case(("train", "--batch-size", "0"), "--batch-size", 2),
        Case(("status", "--pause", "--resume"), "exclude each other", 2),
        Case(("chat",), "doppelbot model download", 1, seconds=20),
        Case(
            ("facts", "search", "где ты живёшь"), "doppelbot model download embedder", 1, seconds=20
        ),
    ],
    ids=lambda c: " ".join(c.args),
)
def test_the_console_entry_point_prints_no_traceback(tmp_path: Path, case: Case) -> None:
    data = tmp_path / "data"
    if case.args[0] == "facts":
        code, out, err, _ = _python_m(
            ["--data-dir", str(data), "facts", "add", "Я в Берлине"], tmp_path
        )
        assert code == 0, err
    code, out, err, elapsed = _python_m(["--data-dir", str(data), *case.args], tmp_path)
    _assert_one_line(out, err, code, case, elapsed)


def test_unknown_settings_are_named_with_the_closest_real_one(tmp_path: Path) -> None:
    env_file = tmp_path / "settings.env"
    env_file.write_text("DOPPELBOT_TOPP=0.5\nAPI_ID=5\n", encoding="utf-8")
    code, _, err, _ = _python_m(
        ["--env-file", str(env_file), "--data-dir", str(tmp_path / "d"), "status"],
        tmp_path,
        DOPPELBOT_DENYLIST="@boss",
    )
    assert code == 0, err
    warnings = " ".join(err.split())
    assert "DOPPELBOT_DENYLIST (environment) is not a doppelbot setting" in warnings
    assert "did you mean DOPPELBOT_DENY_LIST?" in warnings
    assert "DOPPELBOT_TOPP" in warnings and "did you mean DOPPELBOT_TOP_P?" in warnings
    assert "API_ID in" in warnings and "(DOPPELBOT_API_ID)" in warnings
    assert warnings.count("DOPPELBOT_DENYLIST") == 1  # printed once


# --- a read-only data directory -------------------------------------------------------------------
def _read_only(folder: Path) -> list[str] | None:
    """A command prefix that runs with ``folder`` read-only: a plain chmod for a normal user,
    a private read-only bind mount for root (who ignores permissions); None when neither works."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount --bind {folder} {folder} && "
            f"mount -o remount,ro,bind {folder} && ! touch {folder}/.probe",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        return None
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec "$@"',
        "sh",
    ]


@pytest.mark.parametrize("existing", [False, True], ids=["empty", "with-database"])
def test_a_read_only_data_dir_is_one_line(tmp_path: Path, existing: bool) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if existing:
        code, _, err, _ = _python_m(["--data-dir", str(data), "db", "migrate"], tmp_path)
        assert code == 0, err
    prefix = _read_only(data)
    if prefix is None:
        pytest.skip("cannot make a read-only folder here (root without mount namespaces)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPPELBOT_")}
    env.update(PYTHONPATH=str(REPO), DOPPELBOT_API_ID="1", DOPPELBOT_API_HASH="x")
    try:
        # The database (status), the session file (login), and a write-heavy command.
        for args in (
            ["status"],
            ["login"],
            ["import", str(REPO / "tests/fixtures/desktop/result.json")],
        ):
            out = subprocess.run(
                [*prefix, sys.executable, "-m", "doppelbot", "--data-dir", str(data), *args],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                env=env,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
            text = out.stdout + out.stderr
            assert out.returncode == 1, text
            assert "Traceback" not in text and "Event loop is closed" not in text, text
            assert len(text.strip().splitlines()) == 1, text
            assert "not writable" in text or "read-only" in text.lower(), text
    finally:
        data.chmod(0o755)


# --- a server that does not speak MTProto ---------------------------------------------------------
class NotTelegram:
    """A TCP server on 127.0.0.1 answering like a web proxy would: HTTP 400, then close."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read(64)
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
            finally:
                writer.close()

        async def start() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def not_telegram(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotTelegram]:
    from telethon.client import telegrambaseclient

    server = NotTelegram()
    # A fresh session connects to Telethon's default data centre: make that the fake one.
    monkeypatch.setattr(telegrambaseclient, "DEFAULT_IPV4_IP", "127.0.0.1")
    monkeypatch.setattr(telegrambaseclient, "DEFAULT_PORT", server.port)
    yield server
    server.close()


def test_a_non_mtproto_answer_is_one_line_and_login_leaves_no_session(
    tmp_path: Path,
    not_telegram: NotTelegram,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("DOPPELBOT_API_ID", "1")
    monkeypatch.setenv("DOPPELBOT_API_HASH", "x")
    monkeypatch.setenv("DOPPELBOT_PHONE", "+10000000000")
    base = ["--env-file", "/dev/null", "--data-dir", str(data)]

    def run(*args: str) -> tuple[int, str]:
        try:
            main([*base, *args])
        except SystemExit as exc:
            captured = capsys.readouterr()
            return int(exc.code or 0), captured.out + captured.err
        raise AssertionError(f"{args} did not fail")

    code, text = run("login")
    assert code == 1 and "Traceback" not in text and len(text.strip().splitlines()) <= 2, text
    assert "did not answer in Telegram's protocol" in " ".join(text.split())
    # The failed login removed the session file it had created, so the next command says
    # "log in" instead of trying the half-made session.
    assert not (data / "doppelbot.session").exists()
    code, text = run("run")
    assert code == 1 and "doppelbot login" in text, text

    # A session that points at the same server (a proxy in the way of a real login).
    from telethon.sessions import SQLiteSession

    session = SQLiteSession(str(data / "doppelbot"))
    (tmp_path / "model").mkdir()  # `run` checks the model is there before connecting
    monkeypatch.setenv("DOPPELBOT_MODEL", str(tmp_path / "model"))
    session.set_dc(2, "127.0.0.1", not_telegram.port)
    session.save()
    session.close()
    for command in ("export", "run", "login"):
        code, text = run(command)
        assert code == 1 and "Traceback" not in text, text
        assert len(text.strip().splitlines()) <= 2, text
        assert "did not answer in Telegram's protocol" in " ".join(text.split()), text
    assert (data / "doppelbot.session").exists()  # a session that existed before is kept


def test_suggested_commands_are_spelled_as_the_user_runs_doppelbot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After scripts/run.sh, `doppelbot` is .venv/bin/doppelbot, not on PATH: hints say so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "argv", [str(tmp_path / ".venv" / "bin" / "doppelbot")])
    with pytest.raises(SystemExit):
        main(["--env-file", "/dev/null", "--data-dir", str(tmp_path / "data"), "chat"])
    err = " ".join(capsys.readouterr().err.split())
    assert "run `.venv/bin/doppelbot model download`" in err
