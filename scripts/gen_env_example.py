"""Regenerate .env.example from the settings' sections (tests fail when the two drift apart).

Usage: python scripts/gen_env_example.py > .env.example
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doppelbot.config import section_types, setting_fields


def render() -> str:
    out = [
        "# doppelbot settings. Copy to .env and fill in what you need; real environment",
        "# variables override this file. Lists are comma-separated. Empty means 'not set'.",
        "# Grouped as in the code: settings.<section>.<field> (doppelbot/config.py).",
        "",
    ]
    kinds = section_types()
    section = None
    for f in setting_fields():
        if f.section != section:
            section = f.section
            out += [f"# --- {section}: {kinds[section].TITLE} ---", ""]  # type: ignore[attr-defined]
        computed = f.info.default_factory is not None and f.key == "data_dir"
        default = None if computed else f.info.get_default(call_default_factory=True)
        if computed:
            value = "<per-user data dir, e.g. ~/.local/share/doppelbot>"
        elif default is None:
            value = ""
        elif isinstance(default, bool):
            value = "true" if default else "false"
        elif isinstance(default, list | tuple):
            value = ",".join(str(x) for x in default)
        else:
            value = str(default)
        out.append(f"# {f.info.description}")
        line = f"{f.env}={value}"
        # Unset (None) settings and computed defaults stay commented out.
        if default is None:
            line = "# " + line
        out.append(line)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
