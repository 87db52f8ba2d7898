"""``DatasetOptions``: every rule of the dataset builder in one frozen object.

It is the dataset section of the settings (``DatasetSettings``: the rules a user configures)
extended with what a dataset also depends on — the prompt (``settings.prompt``), the model's
input budget (``settings.model.max_input_tokens``) — and with the rules one run may change
(``include_groups``, deduplication, …). ``dataset_options(settings)`` builds it and CLI flags
adjust it with ``dataclasses.replace`` (validated again: a bad value is one ``DatasetError``
line). The builder, the live context of the responder and the tests all take this one object,
so a rule can never be applied differently in training and serving.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, model_validator
from pydantic.dataclasses import dataclass

from doppelbot.config import (
    SECTION_CONFIG,
    DatasetSettings,
    InputBudget,
    ModelSettings,
    PromptSettings,
    Settings,
    default_of,
    extend,
)
from doppelbot.core.errors import DatasetError
from doppelbot.core.prompt import PromptFormat


@dataclass(frozen=True, config=SECTION_CONFIG)
class DatasetOptions(DatasetSettings):
    # --- one run's rules (not settings) ---------------------------------------------------------
    include_reply_to: bool = True
    """A message quoted (reply_to) by the reply or by the last context turn joins the context."""
    reply_to_across_sessions: bool = False
    """Allow a quoted message from an earlier session (off: context never crosses a session)."""
    drop_links: bool = True
    drop_forwarded: bool = True
    stickers_as_emoji: bool = True
    include_groups: bool = False
    dedup_exact: bool = True
    dedup_near: bool = True

    # --- model input (from the model and prompt sections) ---------------------------------------
    max_input_tokens: InputBudget = default_of(ModelSettings, "max_input_tokens")
    prompt: PromptSettings = Field(default_factory=PromptSettings)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, values: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'options'}: "
                + str(error["msg"]).removeprefix("Value error, ")
                for error in exc.errors()
            )
            raise DatasetError(f"bad dataset options: {problems}") from None

    @property
    def prompt_format(self) -> PromptFormat:
        return self.prompt.format

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "session_gap_s": self.session_gap_s}


def dataset_options(settings: Settings, **overrides: Any) -> DatasetOptions:
    """The configured rules (``settings.dataset``) with the prompt and the input budget, and
    one run's ``overrides`` (field names of ``DatasetOptions``)."""
    values = {"prompt": settings.prompt, "max_input_tokens": settings.model.max_input_tokens}
    return extend(DatasetOptions, settings.dataset, **{**values, **overrides})
