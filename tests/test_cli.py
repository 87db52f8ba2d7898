from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from doppelbot.cli import app, main


def _all_commands() -> list[tuple[str, click.Command]]:
    root = typer.main.get_command(app)
    out: list[tuple[str, click.Command]] = []

    def walk(prefix: str, cmd: click.Command) -> None:
        out.append((prefix, cmd))
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(f"{prefix} {name}".strip(), sub)

    walk("", root)
    return out


@pytest.mark.parametrize(
    ("path", "cmd"), _all_commands(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_command_has_help(path: str, cmd: click.Command) -> None:
    if path:
        assert (cmd.help or cmd.short_help or "").strip(), f"{path} has no help"
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert (param.help or "").strip(), f"{path} {param.opts} has no help"
    result = CliRunner().invoke(app, [*path.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_python_m_works(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "doppelbot", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("doppelbot ")


def test_db_migrate_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--env-file", "/dev/null", "--data-dir", str(tmp_path), "db", "migrate"])
    out = capsys.readouterr().out
    assert "applied 0001_initial" in out and "up to date" in out
    main(["--env-file", "/dev/null", "--data-dir", str(tmp_path), "db", "status"])
    assert "initial" in capsys.readouterr().out


def test_typed_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from doppelbot.cli.common import AppState
    from doppelbot.core.errors import StoreError

    @app.command("__boom", hidden=True)
    def boom(ctx: typer.Context) -> None:
        assert isinstance(ctx.find_root().obj, AppState)
        raise StoreError("the disk is on fire")

    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["__boom"])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip() == "error: the disk is on fire"
        with pytest.raises(StoreError):
            main(["--debug", "__boom"])
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "__boom"]
