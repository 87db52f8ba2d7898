"""Rendering model inputs for many samples that share turns.

A turn appears in the context of several consecutive samples; ``MemoPromptFormat`` is
``doppelbot.prompt.PromptFormat`` itself (same ``build_input``/``build_target``, same output,
which ``tests/test_dataset_render.py`` checks) with the persona part and each turn's dialog line
computed once instead of once per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from doppelbot.domain import Turn
from doppelbot.prompt import PromptFormat


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
