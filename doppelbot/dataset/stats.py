"""What a dataset build did: counts per rule, per chat, and length distributions.

Written next to the JSONL files as ``stats.json`` and printed by the CLI as a Rich table, so
the owner sees what the rules threw away before spending hours of training on the result.
Holds counts and lengths only — never message texts. Chat names appear (they are the owner's
own contacts and the file stays on their machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table


def summarize(values: Sequence[int]) -> dict[str, float]:
    """count / mean / p50 / p95 / max of a list of lengths."""
    if not values:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(values)
    n = len(ordered)
    return {
        "count": n,
        "mean": round(sum(ordered) / n, 1),
        "p50": float(ordered[(n - 1) // 2]),
        "p95": float(ordered[min(n - 1, (95 * n) // 100)]),
        "max": float(ordered[-1]),
    }


@dataclass
class ChatStats:
    chat_id: int
    name: str
    messages: int = 0
    kept_messages: int = 0
    candidates: int = 0
    samples: int = 0
    train: int = 0
    validation: int = 0


@dataclass
class AccountStats:
    """What one own account's chats gave (a build over several accounts)."""

    account: str
    chats: int = 0
    messages: int = 0
    samples: int = 0
    train: int = 0
    validation: int = 0


@dataclass
class DatasetStats:
    chats_total: int = 0
    chats_used: int = 0
    chats_skipped: dict[str, int] = field(default_factory=dict)
    messages_read: int = 0
    messages_kept: int = 0
    messages_dropped: dict[str, int] = field(default_factory=dict)
    messages_truncated: int = 0
    stickers_as_emoji: int = 0
    voice_notes_transcribed: int = 0  # notes in the used chats that read as their transcript
    samples_voice_reply: int = 0  # samples whose reply is (partly) a transcribed note
    samples_voice_context: int = 0  # samples with a transcribed note in their context
    pii_replaced: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    turns: int = 0
    candidates: int = 0
    samples_dropped: dict[str, int] = field(default_factory=dict)
    contact_cap: int | None = None
    contact_cap_unsatisfiable: bool = False
    token_checked: int = 0
    token_trimmed: int = 0
    samples: int = 0
    train: int = 0
    validation: int = 0
    validation_from_date: int | None = None
    context_chars: dict[str, float] = field(default_factory=dict)
    context_turns: dict[str, float] = field(default_factory=dict)
    reply_chars: dict[str, float] = field(default_factory=dict)
    input_tokens_counted: dict[str, float] = field(default_factory=dict)
    per_chat: dict[int, ChatStats] = field(default_factory=dict)
    #: By own account (a build from the store; empty for in-memory chats).
    per_account: dict[str, AccountStats] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_chat"] = [
            asdict(c) for c in sorted(self.per_chat.values(), key=lambda c: (-c.samples, c.chat_id))
        ]
        return data

    def rich_tables(self, top_chats: int = 15) -> list[Table]:
        """The summary and the biggest chats, for the CLI."""

        summary = Table(title="dataset", show_header=True, header_style="bold")
        summary.add_column("what")
        summary.add_column("count", justify="right")

        def row(label: str, value: object, style: str | None = None) -> None:
            summary.add_row(label, str(value), style=style)

        row("chats used / total", f"{self.chats_used} / {self.chats_total}")
        for reason, n in sorted(self.chats_skipped.items()):
            row(f"  chats skipped: {reason}", n, "dim")
        row("messages read", self.messages_read)
        row("messages kept", self.messages_kept)
        for reason, n in sorted(self.messages_dropped.items()):
            if n:
                row(f"  dropped: {reason}", n, "dim")
        if self.messages_truncated:
            row("  truncated (long)", self.messages_truncated, "dim")
        if self.stickers_as_emoji:
            row("  stickers → emoji", self.stickers_as_emoji, "dim")
        if self.voice_notes_transcribed:
            row("  voice notes as transcripts", self.voice_notes_transcribed, "dim")
        for kind, n in sorted(self.pii_replaced.items()):
            if n:
                row(f"  PII replaced: {kind}", n, "dim")
        row("sessions / turns", f"{self.sessions} / {self.turns}")
        row("sample candidates", self.candidates)
        for reason, n in sorted(self.samples_dropped.items()):
            if n:
                row(f"  dropped: {reason}", n, "dim")
        if self.contact_cap is not None:
            row("  contact cap (samples per chat)", self.contact_cap, "dim")
        if self.contact_cap_unsatisfiable:
            row("  contact cap", "not applied: too few chats", "yellow")
        if self.token_trimmed:
            row("  context trimmed for tokens", self.token_trimmed, "dim")
        row("samples", self.samples, "bold")
        row("  train / validation", f"{self.train} / {self.validation}")
        if len(self.per_account) > 1:
            for own in self.per_account.values():
                row(
                    f"  account {own.account}: chats / messages / samples",
                    f"{own.chats} / {own.messages} / {own.samples}",
                    "dim",
                )
        if self.samples_voice_reply or self.samples_voice_context:
            row("  replies from voice notes", self.samples_voice_reply)
            row("  contexts with voice notes", self.samples_voice_context, "dim")
        for label, dist in (
            ("context chars", self.context_chars),
            ("context turns", self.context_turns),
            ("reply chars", self.reply_chars),
            ("input tokens (counted)", self.input_tokens_counted),
        ):
            if dist.get("count"):
                row(
                    f"{label} mean/p50/p95/max",
                    f"{dist['mean']:g} / {dist['p50']:g} / {dist['p95']:g} / {dist['max']:g}",
                )

        chats = Table(title=f"top {top_chats} chats by samples", header_style="bold")
        for col in ("chat", "name", "messages", "kept", "samples", "train", "validation"):
            chats.add_column(col, justify="left" if col == "name" else "right")
        for c in sorted(self.per_chat.values(), key=lambda c: (-c.samples, c.chat_id))[:top_chats]:
            chats.add_row(
                str(c.chat_id),
                c.name,
                str(c.messages),
                str(c.kept_messages),
                str(c.samples),
                str(c.train),
                str(c.validation),
            )
        return [summary, chats]
