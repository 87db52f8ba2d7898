"""The prompt format, shared by the dataset builder, the trainer and the live bot.

One module builds every model input and target and decodes every model output, so training and
serving can never disagree about the format. Pure Python: no tokenizer, no torch.

Format (FRED-T5's "SC1" denoising prompt, the task it was pretrained on, so a small dataset
suffices to teach it the owner's replies)::

    input : <SC1>{persona}[ {facts}] Ваш прошлый диалог: \n{label}: {text}…
             Твой ответ: <extra_id_0>   (one line; wrapped here)
    target: <extra_id_0>{reply}</s>
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import EmptyReplyError

SC1 = "<SC1>"
SPAN = "<extra_id_0>"
EOS = "</s>"
DIALOG_HEADER = "Ваш прошлый диалог: "
ANSWER_CUE = " Твой ответ: "
FACTS_HEADER = "Факты обо мне: "

# Control tokens a stranger could type to steer the model; they never reach a prompt from text.
_CONTROL_RE = re.compile(r"<\s*(?:/?s|pad|unk|SC\d+|LM|NLU|NLG|S2S|extra_id_\d+|\|endoftext\|)\s*>")
_SPACES_RE = re.compile(r"[ \t]+")


def sanitize(text: str) -> str:
    """Remove model control tokens from user text and collapse runs of spaces."""
    # The dataset builder calls this for millions of turns: skip each regex when it cannot match.
    if "<" in text:
        text = _CONTROL_RE.sub("", text)
    if "  " in text or "\t" in text:
        text = _SPACES_RE.sub(" ", text)
    return text.strip()


@lru_cache(maxsize=16)
def fake_turn_pattern(*labels: str) -> re.Pattern[str]:
    """A line break followed by something that reads like a speaker label (``Я:``,
    ``Собеседник:``, any spacing or case): inside one message it would fake a turn."""
    names = "|".join(re.escape(label.strip()) for label in labels if label.strip())
    return re.compile(rf"[ \t]*\n[ \t]*(?=(?:{names})[ \t]*:)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """How a prompt is written; ``settings.prompt.format`` is the configured one."""

    persona: str
    role_other: str
    role_owner: str

    def label(self, role: Role) -> str:
        return self.role_owner if role is Role.OWNER else self.role_other

    def persona_part(self, facts: Sequence[str] = ()) -> str:
        persona = sanitize(self.persona)
        cleaned = [f for f in (sanitize(x).rstrip(".") for x in facts) if f]
        if cleaned:
            persona = f"{persona} {FACTS_HEADER}{'; '.join(cleaned)}.".strip()
        return persona

    def turn_text(self, text: str) -> str:
        """A turn's text as it appears in the dialog: sanitized, and with no line of it that
        reads like another speaker's turn — a stranger writing "привет\\nЯ: …" must not put
        words into the owner's mouth (such a line is joined to the one before it)."""
        clean = sanitize(text)
        if "\n" in clean:
            clean = fake_turn_pattern(self.role_other, self.role_owner).sub(" ", clean)
        return clean

    def dialog_lines(self, turns: Sequence[Turn]) -> list[str]:
        return [f"{self.label(t.role)}: {self.turn_text(t.text)}" for t in turns]

    def build_input(self, turns: Sequence[Turn], facts: Sequence[str] = ()) -> str:
        persona = self.persona_part(facts)
        head = f"{SC1}{persona} " if persona else SC1
        body = "\n".join(self.dialog_lines(turns))
        return f"{head}{DIALOG_HEADER}\n{body}{ANSWER_CUE}{SPAN}"

    def build_target(self, reply: str) -> str:
        return build_target(reply)


def build_target(reply: str) -> str:
    """The training target for a reply (independent of persona and labels)."""
    return f"{SPAN}{sanitize(reply)}{EOS}"


def decode_reply(raw: str) -> str:
    """Model output → reply text. Strips the span token, cuts at ``</s>``, trims.

    Raises ``EmptyReplyError`` when nothing usable is left: an empty reply is a failed
    generation and must never be sent.
    """
    text = raw.replace("<pad>", "")
    text = text.replace(SPAN, "", 1) if text.lstrip().startswith(SPAN) else text
    cut = text.find(EOS)
    if cut >= 0:
        text = text[:cut]
    # A second span token means the model started another denoising span: stop there.
    nxt = _CONTROL_RE.search(text)
    if nxt:
        text = text[: nxt.start()]
    text = text.strip()
    if not text:
        raise EmptyReplyError("the model produced an empty reply")
    return text
