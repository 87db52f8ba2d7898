"""SQLite persistence: the database/migrations core and one small repository module per area."""

from doppelbot.store.database import Database

__all__ = ["Database"]
