"""Grader requests in OpenAI's shapes (string_check, text_similarity, score_model, multi), each checked when it is
submitted: templates and formulas by adapters.graders, the shapes here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from adapters.graders import FORMULA_FUNCTIONS, GraderError, check_grader, check_template
from app.schemas.common import Request

MAX_GRADERS = 8
MAX_TEMPLATE_CHARS = 8000
MAX_SCORE = 1e6  # a score model's range: means of such scores stay finite


def _template(value: str) -> str:
    try:
        check_template(value)
    except GraderError as exc:
        raise ValueError(str(exc)) from None
    return value


Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS, json_schema_extra={"format": "grader-template"},
                                description=(
    "text with placeholders: {{item.<field>}} (a field of the dataset line: dotted names and [n] list indexes, "
    "e.g. {{item.messages[-1].content}}; {{item.reference_answer}} is the line's reference answer) and "
    "{{sample.output_text}} (the graded model's answer)")), AfterValidator(_template)]
GraderName = Annotated[str, Field(min_length=1, max_length=64)]


class _Grader(Request):
    name: GraderName

    @model_validator(mode="after")
    def _usable(self) -> Any:
        try:
            check_grader(self.model_dump())
        except GraderError as exc:
            raise ValueError(str(exc)) from None
        return self


class StringCheckGrader(_Grader):
    """Scores 1 when the check holds, else 0: eq / ne compare, like = contains, ilike = contains ignoring case."""

    type: Literal["string_check"]
    input: Template
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_Grader):
    """A similarity in [0, 1] of input to reference."""

    type: Literal["text_similarity"]
    input: Template
    reference: Template
    evaluation_metric: Literal["fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_l"] = Field(
        description="fuzzy_match (RapidFuzz ratio), bleu (sacrebleu sentence BLEU), rouge_1, rouge_2, rouge_l "
                    "(rouge-score F-measure); every one in [0, 1]")
    pass_threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)


class RubricMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Template


class ScoreSampling(Request):
    max_completions_tokens: int = Field(16, ge=1, le=256, description="tokens the scoring model may answer with")
    temperature: float | None = Field(None, ge=0, le=0, description="scoring is greedy: 0 or left out")


class ScoreModelGrader(_Grader):
    """A served model answers a rubric conversation; the first number of its answer, in `range`, is the score."""

    type: Literal["score_model"]
    model: str = Field(min_length=1, max_length=255, description=(
        "the scoring model: the evaluation's base model, or a fine-tuned model, checkpoint or public adapter on it"))
    input: list[RubricMessage] = Field(min_length=1, max_length=16)
    range: tuple[float, float] = Field((0.0, 1.0), description="[low, high]: scores outside it are errors")
    pass_threshold: float | None = Field(None, allow_inf_nan=False)
    sampling_params: ScoreSampling = Field(default_factory=lambda: ScoreSampling.model_validate({}))

    @model_validator(mode="after")
    def _bounded_range(self) -> ScoreModelGrader:
        if not all(abs(value) <= MAX_SCORE for value in self.range):  # NaN fails this too
            raise ValueError(f"range must hold two numbers between -{MAX_SCORE:g} and {MAX_SCORE:g}")
        return self


InnerGrader = Annotated[StringCheckGrader | TextSimilarityGrader | ScoreModelGrader, Field(discriminator="type")]
FormulaName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class MultiGrader(_Grader):
    """Its graders' scores combined by an arithmetic formula over their names."""

    type: Literal["multi"]
    graders: dict[FormulaName, InnerGrader] = Field(min_length=1, max_length=MAX_GRADERS,
                                                   json_schema_extra={"additionalProperties": False})
    calculate_output: str = Field(min_length=1, max_length=500, json_schema_extra={"format": "grader-formula"},
                                  description=(
        "arithmetic over the graders' names: numbers, + - * / **, parentheses and "
        + ", ".join(FORMULA_FUNCTIONS) + "; e.g. '0.7 * rouge + 0.3 * exact'"))
    pass_threshold: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _names_are_not_functions(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("graders"), dict):
            taken = sorted(set(data["graders"]) & set(FORMULA_FUNCTIONS))
            if taken:
                raise ValueError(f"graders may not be named {', '.join(taken)}: calculate_output's functions are")
        return data


Grader = Annotated[StringCheckGrader | TextSimilarityGrader | ScoreModelGrader | MultiGrader,
                   Field(discriminator="type")]


def _distinct_names(graders: list[Any]) -> list[Any]:
    names = [g.name for g in graders]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each grader needs a name of its own; {', '.join(repeated)} is used twice")
    return graders


# A request's graders: each named differently (results list them by name).
Graders = Annotated[list[Grader], AfterValidator(_distinct_names)]


class GradeResult(BaseModel):
    name: str
    type: str
    score: float | None = Field(description="the mean score over the graded examples")
    pass_rate: float | None = Field(description="share of examples that passed (string_check: the check held; "
                                                "others: score ≥ pass_threshold); null without a threshold")
    examples: int = Field(description="examples graded (those asked for a greedy answer)")
    errors: int = Field(description="examples scored the grader's minimum because a field was missing or the "
                                    "scoring model's answer held no number in range")
    first_error: str | None
    parts: dict[str, float | None] | None = Field(None, description="multi: the mean of each of its graders")
