"""Chat-completion and completion requests/responses (OpenAI shape)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.schemas.common import Request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


FUNCTION_NAME = Field(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$",
                      description="letters, digits, underscores and dashes, at most 64")


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = FUNCTION_NAME
    arguments: str = Field(max_length=65536, description="the arguments, a JSON object as text")


class ToolCallIn(BaseModel):
    """A tool call the assistant made, sent back in the conversation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(default=None, description="required except on an assistant "
                                                                             "message with tool_calls")
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=128, description="assistant messages only")
    tool_call_id: str | None = Field(default=None, max_length=128, description="tool messages only (required there)")

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is given only on assistant messages")
        if (self.tool_call_id is None) != (self.role != "tool"):
            raise ValueError("a tool message needs tool_call_id, the id of the call it answers; other roles take "
                             "none")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        for call in self.tool_calls or []:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool_calls: the arguments of call {call.id!r} are not a JSON object")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


# OpenAI's limits on logit_bias: a step applies every entry, so their number is capped.
MAX_LOGIT_BIAS_ENTRIES = 300


def _logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return value
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    for key, bias in value.items():
        if not key.isascii() or not key.isdigit() or len(key) > 9:
            raise ValueError(f"keys are token ids as strings, such as \"50256\"; got {key!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"values are between -100 and 100; got {bias} for token {key}")
    return value


LogitBias = Annotated[dict[str, float] | None, AfterValidator(_logit_bias), Field(
    default=None, description="token id (as a string) -> a bias from -100 to 100 added to its logit before sampling "
                              f"(at most {MAX_LOGIT_BIAS_ENTRIES} entries)",
    json_schema_extra={"maxProperties": MAX_LOGIT_BIAS_ENTRIES, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                       "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})]


class SamplingFields(Request):
    model: str = Field(min_length=1, max_length=255)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    # torch's generators take a 64-bit seed, signed or not; a larger one is a 400 here, not a 500 at sampling.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=128, description="choices to generate for the prompt (at most "
                                                         "ADAPTERY_MAX_CHOICES_PER_REQUEST)")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=10, description="as transformers and vLLM: a prompt or generated token's positive "
                                               "logit is divided by it, a negative one multiplied (1: off)")
    logit_bias: LogitBias
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def engine_logprobs(self) -> int | None:
        """How many alternatives per token the engine reports (None: no logprobs)."""
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)[:4]


class JsonSchemaFormat(Request):
    """OpenAI's `response_format.json_schema`: a named JSON Schema the answer must satisfy."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$",
                      description="letters, digits, underscores and dashes, at most 64")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="a JSON Schema object; absent: any JSON object. The regex "
                                                  "keywords (pattern, patternProperties) are refused")
    strict: bool | None = Field(default=None, description="true: as OpenAI's strict mode, an object that does not "
                                                          "set additionalProperties holds its declared keys only. "
                                                          "The answer is constrained to the schema either way")


class ResponseFormat(Request):
    """OpenAI's response_format: "text" (the default), "json_object" (any JSON object) or "json_schema" (a JSON
    document valid against the given schema), the last two by constrained decoding in the engine."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, description='with type "json_schema" (required '
                                                                           'there), and only then')

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is given only with type "json_schema", not {self.type!r}')
        return self

    def constraint(self) -> tuple[bool, dict[str, Any] | None, bool]:
        """(whether the answer is JSON, its schema: None for any JSON object, whether strict)."""
        if self.type == "text":
            return False, None, False
        if self.json_schema is None:
            return True, None, False
        return True, self.json_schema.schema_, bool(self.json_schema.strict)


class FunctionDefinition(Request):
    name: str = FUNCTION_NAME
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON Schema object (absent: no "
                                                                         "arguments); the regex keywords are refused")
    strict: bool | None = Field(default=None, description="accepted; calls forced by tool_choice are always "
                                                          "constrained to the parameters")


class ToolDefinition(Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Request):
    name: str = FUNCTION_NAME


class NamedToolChoice(Request):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = Field(
        default=None, description='{"type": "text"} (the default), {"type": "json_object"}, or {"type": "json_schema", '
                                  '"json_schema": {"name": ..., "schema": {...}, "strict": true}}')
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives per token (needs logprobs)")
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128, description="functions the model may "
                                                                                         "call (at most 128)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, validate_default=True,
        description='"auto" (the default with tools), "none", "required" (at least one call, constrained) or '
                    '{"type": "function", "function": {"name": ...}} (that call)')
    parallel_tool_calls: bool | None = Field(default=None, validate_default=True,
                                             description="several calls in one answer (default true)")

    @field_validator("tools")
    @classmethod
    def _names_differ(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in value or []]
        if len(set(names)) != len(names):
            raise ValueError("two functions have the same name")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits_the_tools(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if value in (None, "none"):
            return value
        if value != "auto" and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not one of the tools")
        return value

    @field_validator("parallel_tool_calls")
    @classmethod
    def _one_constraint(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        response_format = info.data.get("response_format")
        if info.data.get("tools") and info.data.get("tool_choice") != "none" and response_format is not None \
                and response_format.type != "text":
            raise ValueError("response_format json_object / json_schema and tools cannot be combined (checked "
                             "here, the last tool field); constrain the call with the function's parameters instead")
        return value

    def tool_mode(self) -> str:
        """none (no tools offered or tool_choice none), auto, required, or function (one named call)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "function"
        return self.tool_choice or "auto"

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _one_prompt(schema: dict[str, Any]) -> None:
    # The server takes one non-empty prompt, as a string or as a list holding exactly one string.
    text = {"type": "string", "minLength": 1}
    schema["anyOf"] = [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(json_schema_extra=_one_prompt,
                                    description="one prompt: a string, or a list of exactly one string")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="report each token's logprob and this many "
                                                                       "alternatives")
    best_of: int | None = Field(default=None, ge=1, description="not supported beyond best_of = n")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of is not supported (generating best_of choices server-side and returning the "
                             "n best); ask for n choices instead")
        return value

    def engine_logprobs(self) -> int | None:
        return self.logprobs


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int] = Field(description="each token's offset in the choice's text")


class CalledFunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str = Field(description="stop, length or tool_calls")
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str = Field(description="stop or length")
    logprobs: CompletionLogprobs | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


# With "stream": true the answer is server-sent events: one `data: <chunk JSON>` per token, then `data: [DONE]`.
EVENT_STREAM = {"text/event-stream": {"schema": {
    "type": "string", "description": "server-sent events: `data: {chunk}` lines (object chat.completion.chunk or "
                                     "text_completion), ending with `data: [DONE]`"}}}
