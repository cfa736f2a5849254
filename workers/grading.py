"""Grading a set of models' answers with an evaluation's graders: every score_model grader's conversations are
collected first and answered in batches, one scoring model at a time, then each grader scores each answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.graders import Ungradeable, grade, score_models, scorer_messages, summarise

# (the scoring model's name, conversations, the tokens each may answer with) → the answers, in order.
Scorer = Callable[[str, list[list[dict[str, str]]], int], list[str | None]]


def graded_items(records: list[dict[str, Any]], examples: list[Any], tokenizer: Any,
                 max_examples: int | None) -> list[dict[str, Any]]:
    """The lines asked for a greedy answer (workers.training.evaluation.answerable), in order, each with its
    `reference_answer`: what the graders' {{item.…}} reads. `records[i]` is the line `examples[i]` encodes."""
    from workers.training.evaluation import answer_text, answerable, prompt_and_answer

    items = []
    for i in answerable(examples, max_examples):
        pair = prompt_and_answer(examples[i])
        assert pair is not None  # answerable() keeps only examples with a prompt
        items.append(dict(records[i], reference_answer=answer_text(tokenizer, pair[1])))
    return items


def _answers_of(scored: dict[tuple[int, int, int], str | None], m: int,
                k: int) -> Callable[[dict[str, Any]], str | None]:
    """The scoring models' answers for model m's answer to item k, by score_model grader."""
    return lambda scoring: scored[(id(scoring), m, k)]


def grade_answers(graders: list[dict[str, Any]], items: list[dict[str, Any]], answers: list[list[str]],
                  scorer: Scorer) -> list[list[dict[str, Any]]]:
    """For each model (answers[m][k] is model m's answer to items[k]), each grader's summary, in order."""
    samples = [[{"output_text": text} for text in model_answers] for model_answers in answers]
    scored: dict[tuple[int, int, int], str | None] = {}  # (id of a score_model grader, model, item) → its answer
    for grader in graders:
        for scoring in score_models(grader):
            keys, conversations = [], []
            for m, model_samples in enumerate(samples):
                for k, sample in enumerate(model_samples):
                    try:
                        conversations.append(scorer_messages(scoring, items[k], sample))
                        keys.append((id(scoring), m, k))
                    except Ungradeable:
                        scored[(id(scoring), m, k)] = None
            given = scorer(scoring["model"], conversations, scoring["sampling_params"]["max_completions_tokens"])
            scored.update(zip(keys, given, strict=True))
    results = []
    for m, model_samples in enumerate(samples):
        summaries = []
        for grader in graders:
            grades = [grade(grader, items[k], sample, _answers_of(scored, m, k))
                      for k, sample in enumerate(model_samples)]
            summaries.append(summarise(grader, grades))
        results.append(summaries)
    return results
