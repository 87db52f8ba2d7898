"""What a caller of the export passes in and gets back: the options, the per-chat and per-run
reports, and the progress sink the exporter tells what it is doing.

Kept apart from the exporter so the CLI can name these types without importing Telethon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic.dataclasses import dataclass as pydantic_dataclass

from doppelbot.config import SECTION_CONFIG, ExportSettings, Settings, extend
from doppelbot.core.domain import PeerKind


@pydantic_dataclass(frozen=True, config=SECTION_CONFIG)
class ExportOptions(ExportSettings):
    """The export section of the settings (batching, refetching, FloodWait bounds) with what
    one run exports."""

    include_groups: bool = False
    include_channels: bool = False
    include_saved: bool = False
    chats: tuple[str, ...] = ()
    since: int | None = None
    replied_only: bool = False


def export_options(settings: Settings, **overrides: Any) -> ExportOptions:
    """``settings.export`` with one run's choices (an override of None keeps the setting)."""
    chosen = {name: value for name, value in overrides.items() if value is not None}
    return extend(ExportOptions, settings.export, **chosen)


class ChatStatus(StrEnum):
    COMPLETE = "complete"
    DATE_FLOOR = "complete to date floor"
    GAPS = "gaps"
    FLOOD_STOPPED = "stopped: flood wait"
    FAILED = "failed"


#: The export did not do what was asked for these chats (running it again continues them).
STOPPED = (ChatStatus.FLOOD_STOPPED, ChatStatus.FAILED)


@dataclass(slots=True)
class ChatReport:
    chat_id: int
    name: str
    kind: PeerKind
    fetched: int = 0  # messages newly fetched this run (new + older history)
    refreshed: int = 0  # recent messages fetched again for edits
    stored: int = 0
    server_total: int | None = None
    status: ChatStatus = ChatStatus.COMPLETE
    note: str = ""

    @property
    def missing(self) -> int:
        """Server messages not in the store (0 when unknown or nothing is missing)."""
        if self.server_total is None:
            return 0
        return max(0, self.server_total - self.stored)

    @property
    def stopped(self) -> bool:
        """The chat failed or stopped before the export was done with it."""
        return self.status in STOPPED


@dataclass(slots=True)
class ExportReport:
    chats: list[ChatReport] = field(default_factory=list)
    used_takeout: bool = False
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fetched(self) -> int:
        return sum(c.fetched for c in self.chats)

    @property
    def incomplete(self) -> list[ChatReport]:
        """Chats that failed or stopped: the export did not do what was asked."""
        return [c for c in self.chats if c.stopped]

    @property
    def problems(self) -> list[ChatReport]:
        return [c for c in self.chats if c.stopped or c.status is ChatStatus.GAPS]

    @property
    def with_gaps(self) -> list[ChatReport]:
        """Chats exported to the end whose stored messages fall short of the server's count."""
        return [c for c in self.chats if c.status is ChatStatus.GAPS]

    @property
    def private_chat_ids(self) -> list[int]:
        """The exported one-to-one chats (where voice notes are fetched), in export order."""
        return [c.chat_id for c in self.chats if c.kind == PeerKind.USER]


class ExportProgress(Protocol):
    """What the exporter tells its UI (the CLI draws Rich progress bars from this)."""

    def start(self, chats: int) -> None: ...
    def chat_started(self, chat_id: int, name: str, stored: int, total: int | None) -> None: ...
    def chat_advanced(self, chat_id: int, stored: int, total: int | None) -> None: ...
    def waiting(self, chat_id: int, remaining_s: int) -> None: ...
    def chat_finished(self, report: ChatReport) -> None: ...
    def note(self, text: str) -> None: ...


class NullProgress:
    def start(self, chats: int) -> None:
        pass

    def chat_started(self, chat_id: int, name: str, stored: int, total: int | None) -> None:
        pass

    def chat_advanced(self, chat_id: int, stored: int, total: int | None) -> None:
        pass

    def waiting(self, chat_id: int, remaining_s: int) -> None:
        pass

    def chat_finished(self, report: ChatReport) -> None:
        pass

    def note(self, text: str) -> None:
        pass
