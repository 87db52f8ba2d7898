"""Silencing model libraries that are already imported.

``doppelbot.logs`` turns their warnings and progress bars off through the environment, which
they read when imported; in a process that imported them before (tests, a long-lived caller)
that is too late, so their own switches are used here. Lives in ``doppelbot.model`` because only
the model modules may import these libraries.
"""

from __future__ import annotations

import sys


def silence_loaded_libraries() -> None:
    """Errors only, no progress bars, for transformers and huggingface_hub if imported."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
