"""Importers of history from files (no network, no telethon): Telegram Desktop JSON exports."""
