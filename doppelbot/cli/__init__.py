"""The ``doppelbot`` command line.

Each area of the product has its own module here holding its commands; this module only wires
them into one Typer app and turns ``DoppelbotError`` into one clear line and a non-zero exit.
Command modules import heavy libraries (torch, telethon) inside the command bodies only, so
``doppelbot --help`` stays fast and torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer

try:
    import click
except ImportError:  # recent typer bundles its own click and no longer installs it
    click = None  # type: ignore[assignment]

from doppelbot import __version__
from doppelbot.cli import (
    accounts_cmd,
    adapter_cmd,
    chat_cmd,
    dataset_cmd,
    db_cmd,
    export_cmd,
    facts_cmd,
    feedback_cmd,
    model_cmd,
    run_cmd,
    ssa_cmd,
    train_cmd,
    voice_cmd,
)
from doppelbot.cli.common import AppState, with_invocation
from doppelbot.core.errors import DoppelbotError
from doppelbot.instance import invoked_with

app = typer.Typer(
    name="doppelbot",
    help="Your Telegram doppelganger: export your chats, fine-tune FRED-T5 on them, and let it "
    "answer in your voice — with review in Saved Messages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"doppelbot {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and DEBUG logs."),
    env_file: Path | None = typer.Option(
        None,
        "--env-file",
        help="Settings file read before the environment (default: ./.env when it exists; "
        "a file named here must exist).",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Override DOPPELBOT_DATA_DIR for this command."
    ),
    account: str | None = typer.Option(
        None,
        "--account",
        metavar="NAME",
        help="The own Telegram account to work as (login, export, import, run, status…; "
        "`doppelbot accounts` lists them). Default: the account logged in without a name.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Global options."""
    overrides = {"data_dir": data_dir} if data_dir else {}
    ctx.obj = AppState(
        env_file=env_file or Path(".env"),
        env_file_required=env_file is not None,
        debug=debug,
        overrides=overrides,
    )
    ctx.obj.use_account(account)


app.command("login", help="Log in to Telegram (phone, code, 2FA) and store the session.")(
    export_cmd.login
)
app.command("accounts", help="List your own Telegram accounts: messages, last export, session.")(
    accounts_cmd.accounts
)
app.command("export", help="Export your private chats over MTProto into the local database.")(
    export_cmd.export
)
app.command("import", help="Import a Telegram Desktop export (result.json) into the database.")(
    export_cmd.import_desktop
)
app.command(
    "transcribe",
    help="Transcribe stored voice notes that have a local file (after `import`).",
)(voice_cmd.transcribe)
app.command("dataset", help="Build the fine-tuning set (context → my reply) as JSONL.")(
    dataset_cmd.dataset
)
app.add_typer(facts_cmd.app, name="facts", help="Manage facts about you (the knowledge base).")
app.add_typer(
    model_cmd.app,
    name="model",
    help="Get the models (download, list) and inspect the reply model (quantisation check).",
)
app.command("chat", help="Talk to your doppelganger in the terminal.")(chat_cmd.chat)
app.command("train", help="Fine-tune a LoRA adapter on your dataset (SFT, feedback or DPO).")(
    train_cmd.train
)
app.command("eval", help="Evaluate an adapter on the validation split (optionally vs another).")(
    train_cmd.evaluate
)
app.add_typer(adapter_cmd.app, name="adapter", help="Choose which adapter the bot serves.")
app.command("run", help="Run the userbot: answer incoming private messages in your voice.")(
    run_cmd.run
)
app.command("status", help="Show pause state, reply counts and the last replies.")(run_cmd.status)
app.add_typer(feedback_cmd.app, name="feedback", help="Export and summarise owner feedback.")
app.add_typer(
    ssa_cmd.app, name="ssa", help="SSA labelling (sensibleness/specificity) in Saved Messages."
)
app.add_typer(db_cmd.app, name="db", help="Database schema: migrate and status.")
app.add_typer(db_cmd.config_app, name="config", help="Show the effective settings.")


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class ``name`` as the installed typer raises it.

    Recent typer bundles its own copy of click (``typer._click``), whose exceptions are not
    ``click``'s; older typer raises ``click``'s own. Both are caught, found through the classes
    typer exports rather than through a private module path.
    """
    found: list[type[BaseException]] = []
    for exported in (typer.BadParameter, typer.Exit, typer.Abort):
        found += [c for c in exported.__mro__ if c.__name__ == name]
    if click is not None:
        with contextlib.suppress(AttributeError):
            found.append(getattr(click.exceptions, name))
    return tuple(dict.fromkeys(found))


_CLICK_ERRORS = _click_classes("ClickException")
_ABORTS = (typer.Abort, *_click_classes("Abort"))
_EXITS = (typer.Exit, *_click_classes("Exit"))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every failure becomes one line (or click's short usage
    block) and a non-zero exit; a traceback only with ``--debug``."""

    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    invoked_with(args)
    debug = "--debug" in args
    try:
        code = command.main(args=args, prog_name="doppelbot", standalone_mode=False)
        if isinstance(code, int) and code != 0:  # typer.Exit(code) comes back as a value
            raise SystemExit(code)
    except DoppelbotError as exc:
        if debug:
            raise
        colour = "red" if exc.prefix == "error" else "yellow"
        typer.secho(f"{exc.prefix}: {with_invocation(str(exc))}", err=True, fg=colour)
        raise SystemExit(exc.exit_code) from None
    except _ABORTS:
        typer.echo("Aborted.", err=True)
        raise SystemExit(130) from None
    except _EXITS as exc:
        raise SystemExit(getattr(exc, "exit_code", 0)) from None
    except _CLICK_ERRORS as exc:  # usage errors: click's own short message, exit 2
        exc.show()  # type: ignore[attr-defined]
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        # A failure no layer translated is a bug, but the user still gets one line; the
        # traceback is one --debug away.
        if debug:
            raise
        logging.getLogger("doppelbot.cli").debug("unexpected failure", exc_info=True)
        typer.secho(
            f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            err=True,
            fg="red",
        )
        raise SystemExit(1) from None
