"""The Telegram adapter: the only package that imports telethon.

It builds the client (``client``), maps Telethon objects to the core's dataclasses
(``mapping``), turns Telethon errors into ours (``errors``), logs in (``login``) and exports
history into SQLite (``export``). Nothing here is imported at CLI start-up; commands import it
inside their bodies so ``doppelbot --help`` stays light.
"""
