"""The graders against scores computed by hand: string checks, BLEU, ROUGE and fuzzy match on sentences small enough
to count n-grams on paper, a score model's number, a multi grader's formula; templates over a line's fields; and
formulas that try to be code are refused, never run."""

from __future__ import annotations

import math
import typing
from typing import Any

import pytest

from adapters.graders import (
    SIMILARITY_METRICS,
    STRING_OPERATIONS,
    GraderError,
    calculate,
    check_grader,
    check_template,
    grade,
    parse_score,
    render,
    string_check,
    summarise,
    text_similarity,
)

pytestmark = pytest.mark.fast

CAT = "the cat sat on the mat"
CAT_REFERENCE = "the cat is on the mat"
LINE = {"messages": [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "On the mat."}],
        "reference_answer": "On the mat."}


@pytest.mark.parametrize(("operation", "given", "reference", "expected"), [
    ("eq", "Paris", "Paris", 1.0), ("eq", "Paris", "paris", 0.0), ("ne", "Paris", "paris", 1.0),
    ("like", "It is Paris.", "Paris", 1.0), ("like", "It is PARIS.", "Paris", 0.0),
    ("ilike", "It is PARIS.", "paris", 1.0), ("ilike", "It is Rome.", "paris", 0.0)])
def test_string_check(operation: str, given: str, reference: str, expected: float) -> None:
    assert string_check(operation, given, reference) == expected


def test_bleu_by_hand() -> None:
    """Hypothesis and reference are 6 tokens each (brevity penalty 1). Matching n-grams: 1-grams 5/6 (the, cat, on,
    the, mat), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3, which sacrebleu's
    default 'exp' smoothing counts as 1 / (2 * 3). BLEU is their geometric mean."""
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** (1 / 4)
    assert text_similarity("bleu", CAT, CAT_REFERENCE) == pytest.approx(expected, abs=1e-9)
    assert text_similarity("bleu", CAT, CAT) == pytest.approx(1.0)


def test_rouge_by_hand() -> None:
    """ROUGE-1: 5 of 6 unigrams shared each way; ROUGE-2: 3 of 5 bigrams; ROUGE-L: the longest common subsequence
    'the cat on the mat' is 5 of 6 tokens. Equal lengths, so precision = recall = F-measure."""
    assert text_similarity("rouge_1", CAT, CAT_REFERENCE) == pytest.approx(5 / 6)
    assert text_similarity("rouge_2", CAT, CAT_REFERENCE) == pytest.approx(3 / 5)
    assert text_similarity("rouge_l", CAT, CAT_REFERENCE) == pytest.approx(5 / 6)
    # Recall and precision differ when the lengths do: LCS 'the cat' is 2 of 2 and 2 of 4 → F = 2PR / (P + R).
    assert text_similarity("rouge_l", "the cat", "the big cat sat") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_fuzzy_match_by_hand() -> None:
    """1 - Indel distance / total length: 'abc' → 'abd' deletes c and inserts d, 2 edits over 6 characters."""
    assert text_similarity("fuzzy_match", "abc", "abd") == pytest.approx(1 - 2 / 6)
    assert text_similarity("fuzzy_match", "same", "same") == 1.0


def test_the_schema_offers_exactly_what_the_graders_compute() -> None:
    from app.schemas.graders import StringCheckGrader, TextSimilarityGrader

    assert typing.get_args(StringCheckGrader.model_fields["operation"].annotation) == STRING_OPERATIONS
    assert typing.get_args(TextSimilarityGrader.model_fields["evaluation_metric"].annotation) == SIMILARITY_METRICS
    for metric in SIMILARITY_METRICS:
        assert 0.0 <= text_similarity(metric, CAT, CAT_REFERENCE) <= 1.0


def test_a_score_is_the_first_number_in_range() -> None:
    assert parse_score("Score: 7 out of 10", 0, 10) == 7.0
    assert parse_score("0.85", 0, 1) == 0.85
    assert parse_score("I would say .5", 0, 1) == 0.5
    assert parse_score("11", 0, 10) is None  # out of range
    assert parse_score("no number here", 0, 1) is None


def test_templates_read_the_line_and_the_answer() -> None:
    sample = {"output_text": "Under the table."}
    assert render("Q: {{item.messages[0].content}} A: {{ sample.output_text }} R: {{item.messages[-1].content}}",
                  LINE, sample) == "Q: Where is the cat? A: Under the table. R: On the mat."
    assert render("{{item.messages[1]}}", LINE, sample) == '{"role": "assistant", "content": "On the mat."}'
    for bad in ("{{answer}}", "{{sample.output_json}}", "{{sample}}", "{{item..a}}", "{{item.a[b]}}", "{{ {x} }}"):
        with pytest.raises(GraderError):
            check_template(bad)


def test_formulas_are_arithmetic_and_nothing_else() -> None:
    assert calculate("0.5 * a + 0.5 * max(b, 0.2)", {"a": 1.0, "b": 0.0}) == pytest.approx(0.6)
    assert calculate("sqrt(a) ** 2 - abs(-b) / 4", {"a": 4.0, "b": 2.0}) == pytest.approx(3.5)
    # Undefined values are None, not an exception: the sample scores 0 and is counted as an error.
    for undefined in ("a / b", "log(b)", "10 ** 1000", "(0 - a) ** 0.5", "1e999"):
        assert calculate(undefined, {"a": 1.0, "b": 0.0}) is None, undefined
    multi: dict[str, Any] = {"type": "multi", "name": "m", "graders": {
        "a": {"type": "string_check", "name": "a", "input": "x", "reference": "y", "operation": "eq"}}}
    for code in ("__import__('os').system('true')", "a.real", "[a]", "a if a else 1", "lambda: a", "'a'",
                 "max", "a(1)", "min(a, key=a)", "b", "True + a", "(" * 240 + "a" + ")" * 240, "a" + "+a" * 300):
        with pytest.raises(GraderError):
            check_grader({**multi, "calculate_output": code})
    # Deep but short formulas are arithmetic like any other; a value past 1e12 is undefined (means stay finite).
    assert calculate("-" * 450 + "a", {"a": 2.0}) == 2.0
    assert calculate("abs(" * 90 + "a" + ")" * 90, {"a": -3.0}) == 3.0
    assert calculate("a * 1e308", {"a": 1.0}) is None and calculate("a * 1e12", {"a": 1.0}) == 1e12


def test_grades_and_their_summary() -> None:
    exact = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.reference_answer}}", "operation": "eq"}
    judge = {"type": "score_model", "name": "judge", "model": "m", "range": [0, 10], "pass_threshold": 5,
             "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    overall = {"type": "multi", "name": "overall", "graders": {"exact": exact, "judge": judge},
               "calculate_output": "0.5 * exact + 0.05 * judge", "pass_threshold": 0.5}
    answers = {"On the mat.": "8", "Under the table.": "I cannot tell", "On the mat!": "4"}
    grades = [grade(overall, LINE, {"output_text": text}, lambda scoring, text=text: answers[text])
              for text in answers]
    assert [g.score for g in grades] == pytest.approx([0.5 + 0.4, 0.0, 0.2])
    assert [g.passed for g in grades] == [True, False, False]
    assert grades[1].error is not None and "no number" in grades[1].error
    summary = summarise(overall, grades)
    assert summary["score"] == pytest.approx(1.1 / 3) and summary["pass_rate"] == pytest.approx(1 / 3)
    assert (summary["examples"], summary["errors"]) == (3, 1)
    assert summary["parts"] == pytest.approx({"exact": 1 / 3, "judge": 4.0})
    # A template naming a field the line lacks scores the grader's minimum, counted as an error.
    missing = grade({**exact, "reference": "{{item.completion}}"}, LINE, {"output_text": "x"}, lambda s: None)
    assert (missing.score, missing.passed) == (0.0, False) and "completion" in (missing.error or "")
    assert math.isclose(summarise(exact, []).get("examples"), 0) and summarise(exact, [])["score"] is None


def test_a_sample_too_long_to_grade_is_an_error_not_a_wait() -> None:
    """A template that fills in past 16 000 characters, or a text to compare past 4 000 (ROUGE-L is quadratic), is
    an error for that sample at once."""
    long_line = {"text": "word " * 3000}
    doubled = {"type": "text_similarity", "name": "r", "evaluation_metric": "rouge_l",
               "input": "{{item}}" * 1000, "reference": "{{item}}"}
    assert len(doubled["input"]) == 8000  # what the schema's template limit admits
    for grader in (doubled, {**doubled, "input": "{{item.text}}", "reference": "{{item.text}}"}):
        graded = grade(grader, long_line, {"output_text": "x"}, lambda s: None)
        assert graded.score == 0.0 and "longer than" in (graded.error or ""), graded
    # Identical texts score 1 exactly (sacrebleu alone gives 1 + 4e-16).
    assert text_similarity("bleu", CAT, CAT) <= 1.0
