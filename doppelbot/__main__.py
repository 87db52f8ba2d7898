"""Allows ``python -m doppelbot``, the same entry point as the ``doppelbot`` console script."""

from doppelbot.cli import main

if __name__ == "__main__":
    main()
