"""Rendering model inputs for many samples that share turns.

A turn appears in the context of several consecutive samples; ``MemoPromptFormat`` is
``doppelbot.core.prompt.PromptFormat`` itself (same ``build_input``/``build_target``, same output,
which ``tests/test_dataset_properties.py`` checks) with the persona part and each turn's dialog
line computed once instead of once per sample.

``prompt_frame`` goes one step further for the builder's hot path: a model input is a fixed
prefix, the context turns' dialog lines joined by newlines, and a fixed suffix, so with each
chat's lines made once (``PromptFormat.dialog_lines``) an input is one C-level join. The frame
is derived from ``PromptFormat.build_input`` itself and checked against it, so it cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import DatasetError
from doppelbot.core.prompt import PromptFormat

# probe texts that survive ``sanitize`` unchanged and cannot occur in a persona
_PROBE = (Turn(Role.OTHER, "\u2063probe one\u2063"), Turn(Role.OWNER, "\u2063probe two\u2063"))


def prompt_frame(fmt: PromptFormat) -> tuple[str, str]:
    """``(prefix, suffix)`` with ``fmt.build_input(turns) == prefix + "\\n".join(lines) + suffix``
    for ``lines = fmt.dialog_lines(turns)`` (any non-empty ``turns``, no facts)."""
    lines = fmt.dialog_lines(_PROBE)
    body = "\n".join(lines)
    full = fmt.build_input(_PROBE)
    at = full.find(body)
    prefix, suffix = full[: max(at, 0)], full[at + len(body) :]
    if at < 0 or fmt.build_input(_PROBE[1:]) != prefix + lines[1] + suffix:
        raise DatasetError(
            "the prompt format is no longer prefix + dialog lines + suffix: "
            "update doppelbot.dataset.render.prompt_frame"
        )
    return prefix, suffix


@dataclass(frozen=True, slots=True)
class MemoPromptFormat(PromptFormat):
    """A PromptFormat that memoises per Turn object; make one per batch and drop it after.

    Lines are keyed by the Turn's identity (cheap), and the memo keeps each Turn alive so an
    id is never reused for another turn while the memo exists.
    """

    _memo: dict[int, tuple[Turn, str]] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )
    _persona: list[str] = field(default_factory=list, compare=False, repr=False, hash=False)

    @classmethod
    def of(cls, fmt: PromptFormat) -> MemoPromptFormat:
        return cls(fmt.persona, fmt.role_other, fmt.role_owner)

    def persona_part(self, facts: Sequence[str] = ()) -> str:
        if facts:
            return PromptFormat.persona_part(self, facts)
        if not self._persona:
            self._persona.append(PromptFormat.persona_part(self, ()))
        return self._persona[0]

    def dialog_lines(self, turns: Sequence[Turn]) -> list[str]:
        memo = self._memo
        lines = []
        for turn in turns:
            hit = memo.get(id(turn))
            if hit is None:
                hit = memo[id(turn)] = (turn, PromptFormat.dialog_lines(self, (turn,))[0])
            lines.append(hit[1])
        return lines


def line_prefixes(fmt: PromptFormat) -> tuple[str, str]:
    """``(other, owner)``: each role's dialog line is its prefix + ``sanitize(text)``
    (derived from ``PromptFormat.dialog_lines`` itself and checked against it)."""
    prefixes = []
    for turn in _PROBE:
        line = fmt.dialog_lines((turn,))[0]
        if not line.endswith(turn.text):
            raise DatasetError(
                "a dialog line is no longer a prefix + the text: "
                "update doppelbot.dataset.render.line_prefixes"
            )
        prefixes.append(line[: -len(turn.text)])
    return prefixes[0], prefixes[1]


def target_frame(fmt: PromptFormat) -> tuple[str, str]:
    """``(prefix, suffix)`` with ``fmt.build_target(reply) == prefix + sanitize(reply) +
    suffix`` (derived from ``PromptFormat.build_target`` itself and checked against it)."""
    probe = _PROBE[1].text
    full = fmt.build_target(probe)
    at = full.find(probe)
    if at < 0:
        raise DatasetError(
            "the target is no longer prefix + reply + suffix: "
            "update doppelbot.dataset.render.target_frame"
        )
    return full[:at], full[at + len(probe) :]
