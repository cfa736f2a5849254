"""Evaluation requests and objects: several models on one base model compared on one file."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from app.db.models import Evaluation
from app.schemas.common import Metadata, Request
from app.schemas.graders import MAX_GRADERS, GradeResult, Graders
from app.services.evaluations import MAX_MODELS

ModelName = Annotated[str, Field(min_length=1, max_length=255)]


class EvaluationCreate(Request):
    file: str = Field(min_length=1, max_length=64,
                      description="the id of a processed file with purpose fine-tune (e.g. a validation file)")
    models: list[ModelName] = Field(
        min_length=1, max_length=MAX_MODELS, json_schema_extra={"uniqueItems": True},
        description=f"1 to {MAX_MODELS} distinct models on one base model: the base model id, fine-tuned models and "
                    "checkpoints (GET /v1/models); results come back in this order")
    graders: Graders | None = Field(None, max_length=MAX_GRADERS, description=(
        "graders in OpenAI's shapes (string_check, text_similarity, score_model, multi), each with a distinct name; "
        "they grade every model's greedy answers to the file's prompts, and each result lists their scores"))
    metadata: Metadata = None


class EvaluationResult(BaseModel):
    model: str
    loss: float = Field(description="mean cross-entropy per labelled token (the tokens a fine-tune trains on)")
    mean_token_accuracy: float = Field(description="share of labelled tokens the model predicts exactly (argmax)")
    tokens: int = Field(description="labelled tokens scored (the same for every model of the evaluation)")
    exact_match: float | None = Field(description="share of examples whose greedy answer, up to the end-of-turn "
                                                  "token, equals the reference answer; null when no example has a "
                                                  "prompt to answer (text files)")
    exact_match_examples: int = Field(description="examples asked for a greedy answer")
    grades: list[GradeResult] | None = Field(None, description="one entry per grader, in the order of `graders`")


class EvaluationError(BaseModel):
    code: str
    message: str


class EvaluationObject(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    status: str = Field(description="queued, running, succeeded or failed")
    created_at: int
    finished_at: int | None
    file: str
    models: list[str]
    graders: list[dict[str, Any]] | None = Field(description="the graders as they were submitted")
    base_model: str = Field(description="the base model every evaluated model shares")
    results: list[EvaluationResult] | None = Field(description="one entry per model, in the order of `models`, "
                                                               "once the evaluation has succeeded")
    error: EvaluationError | None
    metadata: dict[str, str] | None


def evaluation_object(evaluation: Evaluation) -> dict[str, Any]:
    error = EvaluationError(code=evaluation.error_code, message=evaluation.error_message or "") \
        if evaluation.error_code else None
    return EvaluationObject(
        id=evaluation.id, status=evaluation.status, created_at=evaluation.created_at,
        finished_at=evaluation.finished_at, file=evaluation.file, models=evaluation.models,
        graders=(evaluation.grading or {}).get("graders"),
        base_model=evaluation.base_model, results=evaluation.results, error=error,
        metadata=evaluation.eval_metadata).model_dump()
