"""Feedback requests and objects: judgements from the playground appended to a tenant's preference dataset."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from app.schemas.common import Request
from app.services.feedback import MAX_LINES_PER_APPEND

DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


Text = Annotated[str, Field(min_length=1, max_length=32_000, pattern=r"\S")]


class LineMessage(Request):
    role: Literal["system", "user", "assistant"]
    content: Text


class LineInput(Request):
    messages: list[LineMessage] = Field(min_length=1, max_length=64, description=(
        "the conversation the answers reply to: a system message only first, ending with a user message"))


class LineAnswer(Request):
    role: Literal["assistant"]
    content: Text


class PreferenceLine(Request):
    """OpenAI's DPO line: two different answers to one conversation, the first preferred."""

    input: LineInput
    preferred_output: list[LineAnswer] = Field(min_length=1, max_length=1)
    non_preferred_output: list[LineAnswer] = Field(min_length=1, max_length=1)


class FeedbackLine(Request):
    """One answer to a conversation, marked good (true) or bad (false): thumbs up / down, for KTO."""

    input: LineInput
    output: list[LineAnswer] = Field(min_length=1, max_length=1)
    label: bool


class FeedbackAppend(Request):
    dataset: str = Field("playground", pattern=DATASET_NAME, description=(
        "the dataset's name (up to 64 letters, digits, '.', '_' and '-'): made on its first lines; its file is "
        "named <dataset>.jsonl"))
    lines: list[PreferenceLine | FeedbackLine] = Field(min_length=1, max_length=MAX_LINES_PER_APPEND, description=(
        "preference lines (OpenAI's DPO format: input, preferred_output, non_preferred_output) or feedback lines "
        "(input, output, label true / false), all of one format, checked as an upload's lines are"))


class FeedbackDatasetObject(BaseModel):
    object: Literal["feedback_dataset"] = "feedback_dataset"
    name: str
    format: Literal["preference", "feedback"]
    file: str = Field(description="the stored file that holds every line so far: name it as a job's training_file "
                                  "(dpo, orpo, simpo: preference; kto: feedback)")
    n_examples: int | None
    version: int = Field(description="how many appends the dataset has had")
    updated_at: int
