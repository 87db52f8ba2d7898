"""Owner commands typed in Saved Messages: parsing, and the table that dispatches them.

Only the owner's own messages in their own Saved Messages chat ever reach this parser (the
review checks that); the parser itself is strict so that ordinary notes the owner keeps in
Saved Messages are never mistaken for commands, and any text that starts with "/" is one.

``CommandTable`` maps each command to its handler (registered with ``@table.register(NAME)``,
as aiogram's dispatcher does); ``dispatch`` parses, calls the handler and turns a user error
into the answer to show. The owner's commands are ``doppelbot.review.owner_commands``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from doppelbot.core.domain import ReplyMode
from doppelbot.core.errors import DoppelbotError

HELP_TEXT = """doppelbot commands (type them here, in Saved Messages):
/pause — stop answering everywhere (survives restarts)
/resume — answer again
/status — pause state, mode, counts, last replies
/mode CHAT auto|review|off — set the reply mode of one chat (CHAT = id or @username);
  /mode auto|review|off sets the default for all chats
/fact TEXT — add a fact about you to the knowledge base
/help — this text
Drafts: reply to a draft card with ok / + (send), no / - (drop), again (new draft), or any other
text to send that instead."""


class CommandName(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STATUS = "status"
    MODE = "mode"
    FACT = "fact"
    HELP = "help"


class CommandError(DoppelbotError):
    """A command was recognised but its arguments are wrong; the text is the hint to show."""


@dataclass(frozen=True, slots=True)
class Command:
    name: CommandName
    chat: str | None = None  # /mode target: an id or @username; None = global default
    mode: ReplyMode | None = None
    text: str | None = None  # /fact


def parse_command(text: str) -> Command | None:
    """``None`` when the text is not a command at all; ``CommandError`` when it is malformed.

    Any text starting with "/" is a command: a mistyped one ("/pasue") is an error to show
    the owner, never a note — and never a correction that would be sent to a contact."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    head, _, rest = stripped.partition(" ")
    name = head[1:].split("@", 1)[0].lower()
    rest = rest.strip()
    try:
        cmd = CommandName(name)
    except ValueError:
        shown = head if len(head) <= 32 else head[:31] + "…"
        raise CommandError(f"unknown command {shown} (see /help)") from None
    if cmd in (CommandName.PAUSE, CommandName.RESUME, CommandName.STATUS, CommandName.HELP):
        return Command(cmd)
    if cmd is CommandName.FACT:
        if not rest:
            raise CommandError("usage: /fact TEXT — e.g. /fact I live in Kazan")
        return Command(cmd, text=rest)
    # /mode
    parts = rest.split()
    modes = {m.value for m in ReplyMode}
    if len(parts) == 1 and parts[0].lower() in modes:
        return Command(cmd, mode=ReplyMode(parts[0].lower()))
    if len(parts) == 2 and parts[1].lower() in modes:
        return Command(cmd, chat=parts[0], mode=ReplyMode(parts[1].lower()))
    raise CommandError("usage: /mode CHAT auto|review|off (CHAT = id or @username), or /mode MODE")


C = TypeVar("C")
Handler = Callable[[Command, C], Awaitable[str]]


class CommandTable(Generic[C]):
    """Command name → handler; ``C`` is what every handler gets besides the command."""

    def __init__(self) -> None:
        self._handlers: dict[CommandName, Handler[C]] = {}

    def register(self, name: CommandName) -> Callable[[Handler[C]], Handler[C]]:
        def add(handler: Handler[C]) -> Handler[C]:
            if name in self._handlers:
                raise ValueError(f"/{name} has a handler already")
            self._handlers[name] = handler
            return handler

        return add

    async def dispatch(self, text: str, context: C) -> str | None:
        """The answer to ``text`` (None: it is not a command); a malformed or unknown
        command, or a handler's ``DoppelbotError``, is answered with what went wrong."""
        try:
            command = parse_command(text)
            if command is None:
                return None
            handler = self._handlers.get(command.name)
            if handler is None:
                raise CommandError(f"/{command.name} is not available here (see /help)")
            return await handler(command, context)
        except DoppelbotError as exc:
            return f"⚠️ {exc}"


def is_command(text: str) -> bool:
    """Whether ``text`` is meant as a command (well-formed or not)."""
    try:
        return parse_command(text) is not None
    except CommandError:
        return True
