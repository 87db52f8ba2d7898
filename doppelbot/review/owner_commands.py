"""What the owner's commands in Saved Messages do: /pause, /resume, /status, /mode, /fact, /help.

Each handler gets the parsed command and a ``CommandContext`` (the store, the settings, who the
owner is, the clock) and returns the short answer posted under the owner's note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from doppelbot.config import Settings
from doppelbot.core.domain import ReplyMode, ReplyStatus
from doppelbot.responder.transport import Clock
from doppelbot.review.commands import HELP_TEXT, Command, CommandError, CommandName, CommandTable
from doppelbot.store import bot_state, history, replies
from doppelbot.store.database import Database
from doppelbot.store.facts import SOURCE_SAVED_MESSAGES, add_fact_ex

log = logging.getLogger("doppelbot.review")

S = ReplyStatus


@dataclass(frozen=True, slots=True)
class CommandContext:
    settings: Settings
    db: Database
    owner_id: int
    clock: Clock


OWNER_COMMANDS: CommandTable[CommandContext] = CommandTable()


@OWNER_COMMANDS.register(CommandName.PAUSE)
async def pause(command: Command, ctx: CommandContext) -> str:
    await bot_state.set_paused(ctx.db, True)
    log.info("review: paused by the owner")
    return "⏸ Paused: no replies anywhere until /resume."


@OWNER_COMMANDS.register(CommandName.RESUME)
async def resume(command: Command, ctx: CommandContext) -> str:
    await bot_state.set_paused(ctx.db, False)
    log.info("review: resumed by the owner")
    return "▶️ Resumed."


@OWNER_COMMANDS.register(CommandName.HELP)
async def show_help(command: Command, ctx: CommandContext) -> str:
    return HELP_TEXT


@OWNER_COMMANDS.register(CommandName.FACT)
async def add_fact(command: Command, ctx: CommandContext) -> str:
    result = await add_fact_ex(ctx.db, command.text or "", SOURCE_SAVED_MESSAGES)
    if result.created:
        return f"📌 Fact #{result.fact.fact_id} saved; replies use it from now on."
    return f"📌 Already known (fact #{result.fact.fact_id})."


@OWNER_COMMANDS.register(CommandName.MODE)
async def set_mode(command: Command, ctx: CommandContext) -> str:
    assert command.mode is not None
    if command.chat is None:
        await bot_state.set_global_reply_mode(ctx.db, command.mode)
        return f"Default mode: {command.mode.value} (chats without their own mode)."
    chat_id, name = await _resolve_chat(ctx, command.chat)
    await bot_state.set_chat_reply_mode(ctx.db, chat_id, command.mode)
    return f"Mode for {name}: {command.mode.value}."


@OWNER_COMMANDS.register(CommandName.STATUS)
async def status(command: Command, ctx: CommandContext) -> str:
    return await status_text(ctx)


async def _resolve_chat(ctx: CommandContext, token: str) -> tuple[int, str]:
    raw = token.strip()
    chat_id: int | None = None
    if raw.lstrip("-").isdigit():
        chat_id = int(raw)
    else:
        found = await history.find_peer_by_username(ctx.db, raw)
        chat_id = None if found is None else found.peer_id
    if chat_id is None or chat_id == ctx.owner_id:
        raise CommandError(
            f"unknown chat {raw!r}: use its id (see /status or `doppelbot status`) or "
            "@username of someone who wrote to you"
        )
    peer = await history.get_peer(ctx.db, chat_id)
    return chat_id, peer.display_name if peer is not None else str(chat_id)


async def status_text(ctx: CommandContext) -> str:
    paused = await bot_state.is_paused(ctx.db)
    mode = await bot_state.global_reply_mode(ctx.db) or ReplyMode(ctx.settings.responder.reply_mode)
    counts = await replies.count_by_status(ctx.db)
    sent_hour = await replies.count_recent_sends(ctx.db, int(ctx.clock.time()) - 3600)
    overrides = await bot_state.chat_mode_overrides(ctx.db)
    lines = [
        "⏸ Paused (send /resume)" if paused else "▶️ Active",
        f"Default mode: {mode.value}",
        f"Drafts waiting: {counts[S.AWAITING_REVIEW]} · sent in the last hour: {sent_hour}",
        "Replies: "
        + (" · ".join(f"{s.value} {counts[s]}" for s in ReplyStatus if counts[s]) or "none"),
    ]
    if overrides:
        names = []
        for chat_id, chat_mode in sorted(overrides.items())[:10]:
            peer = await history.get_peer(ctx.db, chat_id)
            label = peer.display_name if peer is not None else str(chat_id)
            names.append(f"{label} ({chat_id}): {chat_mode.value}")
        lines.append("Chat modes: " + "; ".join(names))
    return "\n".join(lines)
