"""Regenerate .env.example from the Settings model (tests fail when the two drift apart).

Usage: python scripts/gen_env_example.py > .env.example
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doppelbot.config import ENV_PREFIX, Settings

SECTION_MARK = "# --- "


def render() -> str:
    out = [
        "# doppelbot settings. Copy to .env and fill in what you need; real environment",
        "# variables override this file. Lists are comma-separated. Empty means 'not set'.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        if field.default is not PydanticUndefined:
            default = field.default
        elif name == "data_dir":
            default = "<per-user data dir, e.g. ~/.local/share/doppelbot>"
        else:
            default = field.default_factory() if field.default_factory else ""  # type: ignore[call-arg]
        if default is None:
            value = ""
        elif isinstance(default, bool):
            value = "true" if default else "false"
        elif isinstance(default, list):
            value = ",".join(str(x) for x in default)
        else:
            value = str(default)
        out.append(f"# {field.description}")
        line = f"{ENV_PREFIX}{name.upper()}={value}"
        # Unset (None) settings and computed defaults stay commented out.
        if default is None or name == "data_dir":
            line = "# " + line
        out.append(line)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
