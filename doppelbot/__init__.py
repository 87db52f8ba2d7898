"""doppelbot: a Telegram userbot that becomes its owner's digital doppelganger.

The package root stays import-light on purpose: ``doppelbot --help`` must not pull torch,
transformers or telethon, so nothing here imports them.
"""

__version__ = "0.1.0"
