"""``doppelbot chat``: a conversation in the terminal, answered exactly as the bot answers.

The owner plays the other person; every message is answered through the running bot's own path
(``ReplyComposer``: facts for the newest message, the prompt within the input budget, the fact
fallback) by the same model worker, so what the terminal shows is what the bot would send.
Consecutive messages of one speaker are one turn, as in the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from doppelbot.config import GenerationOptions
from doppelbot.core.domain import Role, Turn
from doppelbot.core.errors import PromptTooLongError
from doppelbot.core.ports import ReplyGenerator
from doppelbot.responder.compose import ReplyComposer


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    prompt: str  # what the model was given
    reply: str


@dataclass(eq=False)
class Conversation:
    generator: ReplyGenerator
    composer: ReplyComposer
    options: GenerationOptions
    max_turns: int  # the newest turns the prompt may hold
    turns: list[Turn] = field(default_factory=list)

    def reset(self) -> None:
        self.turns.clear()

    def _add(self, role: Role, text: str) -> None:
        if self.turns and self.turns[-1].role is role:
            self.turns[-1] = Turn(role, f"{self.turns[-1].text}\n{text}")
        else:
            self.turns.append(Turn(role, text))

    async def answer(self, text: str) -> ChatAnswer:
        """The reply to the other person's ``text``. ``PromptTooLongError`` leaves the
        conversation as it was (the message is not taken); another ``GenerationError`` keeps
        the message, unanswered, as the bot would."""
        before = list(self.turns)
        self._add(Role.OTHER, text)
        query = self.turns[-1].text
        facts = await self.composer.retrieve(query)
        try:
            prompt = await self.composer.prompt(self.turns[-self.max_turns :], facts)
        except PromptTooLongError:
            self.turns = before
            raise
        reply = await self.generator.generate(prompt, self.options)
        reply = await self.composer.finish(query, reply, facts)
        self._add(Role.OWNER, reply)
        return ChatAnswer(prompt, reply)
