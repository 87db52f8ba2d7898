"""The review workflow's Telegram side: Saved Messages over Telethon, and the wiring of the
workflow into a running bot.

The workflow itself (``doppelbot.review.workflow``) is core code; this module only gives it a
``SavedMessages`` port and routes the live bot's events to it: new messages (owner answers and
commands in Saved Messages), reactions (on cards, and other people's on the bot's replies) and
the responder's hooks (drafts, sent replies, the owner writing in a chat).
"""

from __future__ import annotations

from telethon import TelegramClient
from telethon import errors as tg_errors

from doppelbot.review.workflow import ReviewWorkflow
from doppelbot.telegram.errors import telegram_errors
from doppelbot.telegram.live import LiveSession


class TelethonSavedMessages:
    """``SavedMessages`` over Telethon ("me" is the owner's own chat)."""

    def __init__(self, client: TelegramClient, *, flood_bound: int | None = None) -> None:
        self._client = client
        self._flood_bound = flood_bound

    async def post(self, text: str, *, reply_to: int | None = None) -> int:
        with telegram_errors(flood_bound=self._flood_bound):
            # parse_mode=None: drafts are shown exactly as they would be sent.
            message = await self._client.send_message(
                "me", text, reply_to=reply_to, link_preview=False, parse_mode=None
            )
        return int(message.id)

    async def edit(self, message_id: int, text: str) -> None:
        with telegram_errors(flood_bound=self._flood_bound):
            try:
                await self._client.edit_message(
                    "me", message_id, text, link_preview=False, parse_mode=None
                )
            except tg_errors.MessageNotModifiedError:
                return

    async def text_of(self, message_id: int) -> str | None:
        with telegram_errors(flood_bound=self._flood_bound):
            message = await self._client.get_messages("me", ids=message_id)
        text = getattr(message, "message", None)
        return text if isinstance(text, str) else None


async def attach_review(session: LiveSession, workflow: ReviewWorkflow) -> None:
    """Wire ``workflow`` into a running bot (``run_live``'s ``on_ready``) and start it: cards
    for drafts left without one, the expiry sweep. The caller closes it after ``run_live``."""
    saved = TelethonSavedMessages(session.client, flood_bound=workflow.settings.flood_wait_max_s)
    workflow.attach(responder=session.responder, saved=saved, owner_id=session.owner_id)
    session.bot.listeners.append(workflow.on_saved_message)
    session.bot.reaction_listeners.append(workflow.on_reactions)
    session.extras["review"] = workflow
    await workflow.start(
        session.catch_up.saved_backlog,
        saved_top_id=session.catch_up.saved_top_id,
        refresh_since=session.down_since,
    )
