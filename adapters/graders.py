"""Graders: score a model's answers to a dataset's lines in the shapes of OpenAI's graders (string_check,
text_similarity, score_model, multi), and check them when they are submitted.

Torch-free: the API checks graders with the same code the worker grades with. Nothing a tenant sends runs as
code or as a pattern: templates are `{{item.path}}` / `{{sample.output_text}}` lookups, a multi grader's
formula is arithmetic over its graders' scores read into a syntax tree and walked here, and a score model's
answer is read for its first number.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

GRADER_TYPES = ("string_check", "text_similarity", "score_model", "multi")
STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_l")
MAX_FORMULA_CHARS = 500
FORMULA_FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log}
# What a template may name: the dataset line (any field of it, plus the reference answer the worker adds) and the
# graded model's answer.
SAMPLE_FIELDS = ("output_text",)
REFERENCE_FIELD = "reference_answer"
# Bounds on what one sample's grading may cost: a filled-in template, and each text a similarity metric compares
# (ROUGE-L's longest common subsequence is quadratic). A sample past them is an error, not a long wait.
MAX_RENDERED_CHARS = 16_000
MAX_COMPARED_CHARS = 4_000
# A formula's value past this is an error: a mean of such values could overflow to infinity.
MAX_FORMULA_VALUE = 1e12

# These two patterns are the project's own, linear in their input; a tenant's text is only ever matched by them.
_PLACEHOLDER = re.compile(r"\{\{([^{}]{0,200})\}\}")
_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]{0,63})|\[(-?[0-9]{1,6})\]")
_NUMBER = re.compile(r"[-+]?(?:[0-9]{1,12}(?:\.[0-9]{1,12})?|\.[0-9]{1,12})")


class GraderError(ValueError):
    """A grader that cannot be used; the message says what is accepted."""


# ---------------------------------------------------------------- templates


def _path(reference: str) -> tuple[str, list[str | int]]:
    """`item.messages[-1].content` → ("item", ["messages", -1, "content"]); GraderError when it is neither an item
    path nor a sample field."""
    text = reference.strip()
    root, _, rest = text.partition(".")
    steps: list[str | int] = []
    position = len(root)
    while position < len(text):
        match = _PATH_STEP.match(text, position)
        if match is None:
            break
        steps.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
    if root not in ("item", "sample") or position != len(text) or not rest and root == "sample":
        raise GraderError(f"'{{{{{reference}}}}}' must be {{{{item.<field>}}}} (dotted fields, [n] list indexes) or "
                          f"{{{{sample.output_text}}}}")
    if root == "sample" and (len(steps) != 1 or steps[0] not in SAMPLE_FIELDS):
        raise GraderError(f"'{{{{{reference}}}}}': a sample has only {', '.join(SAMPLE_FIELDS)}")
    return root, steps


def check_template(template: str) -> None:
    """GraderError naming the first placeholder that is not {{item.…}} or {{sample.output_text}}."""
    for match in _PLACEHOLDER.finditer(template):
        _path(match.group(1))
    if "{{" in _PLACEHOLDER.sub("", template):
        raise GraderError("a '{{' opens no placeholder of the form {{item.<field>}} or {{sample.output_text}}")


class Ungradeable(LookupError):
    """This sample cannot be graded (the message says why); it scores the grader's minimum, counted as an error."""


class MissingField(Ungradeable):
    """A template names a field that this line does not have."""


def _lookup(value: Any, steps: list[str | int], reference: str) -> Any:
    for step in steps:
        listed = isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value)
        if listed or isinstance(step, str) and isinstance(value, dict) and step in value:
            value = value[step]
        else:
            raise MissingField(f"this line has no {reference.strip()}")
    return value


def render(template: str, item: dict[str, Any], sample: dict[str, str]) -> str:
    """The template with each placeholder replaced: strings as they are, other values as JSON."""

    def value(match: re.Match[str]) -> str:
        root, steps = _path(match.group(1))
        found = _lookup(item if root == "item" else sample, steps, match.group(1))
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    rendered = _PLACEHOLDER.sub(value, template)
    if len(rendered) > MAX_RENDERED_CHARS:
        raise Ungradeable(f"a template filled in for this line is longer than {MAX_RENDERED_CHARS} characters")
    return rendered


# ---------------------------------------------------------------- the metrics


def string_check(operation: str, given: str, reference: str) -> float:
    """OpenAI's string check: eq / ne compare whole strings, like is "contains", ilike "contains" ignoring case."""
    if operation == "eq":
        return float(given == reference)
    if operation == "ne":
        return float(given != reference)
    if operation == "like":
        return float(reference in given)
    if operation == "ilike":
        return float(reference.casefold() in given.casefold())
    raise GraderError(f"operation must be one of {', '.join(STRING_OPERATIONS)}")


_ROUGE_KEYS = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}


def text_similarity(metric: str, given: str, reference: str) -> float:
    """Similarity in [0, 1]: fuzzy_match is RapidFuzz's normalised Indel similarity; bleu sacrebleu's sentence
    BLEU / 100; rouge_1 / rouge_2 / rouge_l rouge-score's F-measure."""
    if max(len(given), len(reference)) > MAX_COMPARED_CHARS:
        raise Ungradeable(f"a text to compare is longer than {MAX_COMPARED_CHARS} characters")
    return min(1.0, max(0.0, _similarity(metric, given, reference)))  # sacrebleu may give 1 + 4e-16


def _similarity(metric: str, given: str, reference: str) -> float:
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return float(fuzz.ratio(given, reference)) / 100
    if metric == "bleu":
        import sacrebleu

        return float(sacrebleu.sentence_bleu(given, [reference]).score) / 100
    if metric in _ROUGE_KEYS:
        from rouge_score import rouge_scorer

        key = _ROUGE_KEYS[metric]
        return float(rouge_scorer.RougeScorer([key]).score(reference, given)[key].fmeasure)
    raise GraderError(f"evaluation_metric must be one of {', '.join(SIMILARITY_METRICS)}")


def parse_score(text: str, low: float, high: float) -> float | None:
    """The first number in a score model's answer, if it lies in [low, high]."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    number = float(match.group())
    return number if low <= number <= high else None


# ---------------------------------------------------------------- multi's formula


@lru_cache(maxsize=64)
def _formula_tree(text: str, names: frozenset[str]) -> ast.expr:
    """The formula's syntax tree, checked to hold only numbers, the graders' names, + - * / ** and the functions
    of FORMULA_FUNCTIONS (GraderError otherwise). Cached: a multi grader computes one formula for every answer of
    every model, and the tree is only read."""
    if len(text) > MAX_FORMULA_CHARS:
        raise GraderError(f"calculate_output is at most {MAX_FORMULA_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise GraderError("calculate_output must be an arithmetic formula, e.g. '0.5 * bleu + 0.5 * exact'") \
            from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in FORMULA_FUNCTIONS:
                raise GraderError(f"calculate_output names '{node.id}', which is none of this grader's graders "
                                  f"({', '.join(sorted(names))})")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FORMULA_FUNCTIONS or node.keywords \
                    or not node.args:
                raise GraderError("calculate_output may call only " + ", ".join(FORMULA_FUNCTIONS)
                                  + " (with positional arguments)")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise GraderError("calculate_output may hold numbers, but not strings or other constants")
        elif not isinstance(node, ast.BinOp | ast.UnaryOp | ast.Load | ast.Add | ast.Sub | ast.Mult | ast.Div
                            | ast.Pow | ast.UAdd | ast.USub):
            raise GraderError("calculate_output may use only + - * / ** and parentheses, numbers, the graders' "
                              "names and " + ", ".join(FORMULA_FUNCTIONS))
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and (node.id in FORMULA_FUNCTIONS) != (id(node) in called):
            raise GraderError(f"calculate_output must call '{node.id}'" if node.id in FORMULA_FUNCTIONS
                              else f"calculate_output calls '{node.id}', which is not a function")
    return tree


_OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}


def _evaluate(node: ast.expr, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # _formula_tree admits only numbers
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        result = _OPERATORS[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
        if isinstance(result, complex):  # a negative number to a fractional power
            raise ValueError("complex result")
        return float(result)
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(FORMULA_FUNCTIONS[node.func.id](*(_evaluate(a, values) for a in node.args)))


def calculate(formula: str, values: dict[str, float]) -> float | None:
    """The formula's value for these scores, or None where it is undefined (division by zero, log of 0, …)."""
    try:
        result = _evaluate(_formula_tree(formula, frozenset(values)), values)
    except (ArithmeticError, ValueError, TypeError):
        return None
    return result if math.isfinite(result) and abs(result) <= MAX_FORMULA_VALUE else None


# ---------------------------------------------------------------- checking a request's graders


def check_grader(grader: dict[str, Any]) -> None:
    """GraderError for a grader whose templates or formula cannot be used (the API's schema has checked the
    shape); a multi grader's graders are checked too."""
    kind = grader["type"]
    if kind in ("string_check", "text_similarity"):
        for key in ("input", "reference"):
            try:
                check_template(grader[key])
            except GraderError as exc:
                raise GraderError(f"{key}: {exc}") from None
    elif kind == "score_model":
        low, high = grader["range"]
        if not low < high:
            raise GraderError(f"range must be [low, high] with low < high; got [{low}, {high}]")
        for i, message in enumerate(grader["input"]):
            try:
                check_template(message["content"])
            except GraderError as exc:
                raise GraderError(f"input[{i}].content: {exc}") from None
    elif kind == "multi":
        for name, inner in grader["graders"].items():
            if inner["type"] == "multi":
                raise GraderError(f"graders.{name}: a multi grader's graders are string_check, text_similarity or "
                                  "score_model")
            try:
                check_grader(inner)
            except GraderError as exc:
                raise GraderError(f"graders.{name}.{exc}") from None
        _formula_tree(grader["calculate_output"], frozenset(grader["graders"]))


def score_models(grader: dict[str, Any]) -> list[dict[str, Any]]:
    """The score_model graders in this grader (itself, or a multi grader's), each once."""
    if grader["type"] == "score_model":
        return [grader]
    if grader["type"] == "multi":
        return [g for g in grader["graders"].values() if g["type"] == "score_model"]
    return []


# ---------------------------------------------------------------- grading


def scorer_messages(grader: dict[str, Any], item: dict[str, Any], sample: dict[str, str]) -> list[dict[str, str]]:
    """A score_model grader's conversation for one sample (Ungradeable when a template names what the line lacks,
    or fills in too long). OpenAI's `developer` role is given to the scoring model as `system`."""
    return [{"role": "system" if m["role"] == "developer" else m["role"],
             "content": render(m["content"], item, sample)} for m in grader["input"]]


@dataclass
class Grade:
    score: float
    passed: bool | None  # None: the grader has no pass threshold
    error: str | None = None  # why the sample scored the grader's minimum (a missing field, an unreadable score)
    parts: dict[str, float] | None = None  # a multi grader's graders' scores


def _passed(grader: dict[str, Any], score: float) -> bool | None:
    if grader["type"] == "string_check":
        return score == 1.0
    threshold = grader.get("pass_threshold")
    return None if threshold is None else score >= threshold


def _minimum(grader: dict[str, Any]) -> float:
    return float(grader["range"][0]) if grader["type"] == "score_model" else 0.0


def grade(grader: dict[str, Any], item: dict[str, Any], sample: dict[str, str],
          scorer_answers: Callable[[dict[str, Any]], str | None]) -> Grade:
    """One sample's grade. `scorer_answers(score_model grader)` is that grader's scoring model's answer to this
    sample (None when its conversation could not be built)."""
    try:
        if grader["type"] == "string_check":
            score = string_check(grader["operation"], render(grader["input"], item, sample),
                                 render(grader["reference"], item, sample))
        elif grader["type"] == "text_similarity":
            score = text_similarity(grader["evaluation_metric"], render(grader["input"], item, sample),
                                    render(grader["reference"], item, sample))
        elif grader["type"] == "score_model":
            answer = scorer_answers(grader)
            if answer is None:
                raise Ungradeable("the scoring model was not asked: its conversation names a field this line "
                                  "lacks, its chat template refuses it, or it is longer than the server's "
                                  "ADAPTERY_MAX_EXAMPLE_TOKENS")
            parsed = parse_score(answer, *grader["range"])
            if parsed is None:
                low, high = grader["range"]
                return Grade(_minimum(grader), _passed(grader, _minimum(grader)),
                             error=f"the scoring model's answer holds no number in [{low}, {high}]")
            score = parsed
        else:
            parts = {name: grade(inner, item, sample, scorer_answers) for name, inner in grader["graders"].items()}
            values = {name: part.score for name, part in parts.items()}
            calculated = calculate(grader["calculate_output"], values)
            error = next((f"{name}: {part.error}" for name, part in parts.items() if part.error), None)
            if calculated is None:
                error = error or "calculate_output is undefined for these scores"
            score = 0.0 if calculated is None else calculated
            return Grade(score, _passed(grader, score), error=error, parts=values)
    except Ungradeable as exc:
        return Grade(_minimum(grader), _passed(grader, _minimum(grader)), error=str(exc))
    return Grade(score, _passed(grader, score))


def summarise(grader: dict[str, Any], grades: list[Grade]) -> dict[str, Any]:
    """A grader's result for one model: the mean score, the pass rate, how many samples and how many errors (and,
    for multi, the mean of each of its graders)."""
    count = len(grades)
    passed = [g.passed for g in grades if g.passed is not None]
    summary: dict[str, Any] = {
        "name": grader["name"], "type": grader["type"], "score": _mean([g.score for g in grades]),
        "pass_rate": round(sum(passed) / len(passed), 6) if passed else None,
        "examples": count, "errors": sum(g.error is not None for g in grades),
        "first_error": next((g.error for g in grades if g.error), None)}
    if grader["type"] == "multi":
        summary["parts"] = {name: _mean([(g.parts or {})[name] for g in grades]) for name in grader["graders"]}
    return summary


def _mean(scores: list[float]) -> float | None:
    """The mean, rounded; None for no scores (every score is finite and bounded, so the mean is too)."""
    return round(math.fsum(scores) / len(scores), 6) if scores else None
