"""The reference pages generated from the code: settings and method hyperparameters.

`adaptery reference` writes docs/reference/configuration.md (every field of Settings: its environment variable,
type, default, accepted range and description) and docs/reference/hyperparameters.md (every registered method's
hyperparameters: accepted values from their declared ranges, and the default a job gets, from `resolve()`);
`adaptery reference --check` says which pages differ from what the code renders now (tests/test_reference.py runs
it). Everything is read from the code, so a new setting, method or hyperparameter reaches the pages by running the
command again. The output is the same bytes on every machine: no paths, clocks or environment go into it (the
settings are their declared defaults, whatever ADAPTERY_* this process sees).

No torch here: adapters.methods imports torch and PEFT only inside the functions that train or serve.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import annotated_types

from adapters.methods import DEFAULT_METHOD, METHODS, AdapterMethod, HyperparameterError, TrainingHyperparameters
from adapters.methods.base import auto_batch_size, auto_epochs, declared_range
from app.settings import DEFAULT_BASE_MODEL, Settings

DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "docs" / "reference"
COMMAND = "adaptery reference"

# The headings of the configuration page: each starts at the named field and runs, in declaration order, up to
# the next one's field.
SETTING_GROUPS = (
    ("Server and storage", "host"),
    ("Base models", "default_base_model"),
    ("Compute", "torch_threads"),
    ("Training workers", "worker_device_class"),
    ("Artifact store", "artifact_store_url"),
    ("Serving", "adapter_cache_size"),
    ("Roles and routing", "role"),
    ("Limits", "max_upload_mb"),
    ("Training cadence and reports", "log_every_steps"),
    ("Logs", "log_format"),
    ("Webhooks", "webhook_allowed_hosts"),
    ("Event streams", "event_stream_poll_seconds"),
    ("Reliability", "lease_seconds"),
)

# The base model the hyperparameter defaults are computed for: a Llama-shaped one, as the default SmolLM2 is
# (adapters/base_models.py base_info() reads this from a checkpoint's headers).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_BASE_INFO: dict[str, Any] = {"linear_modules": sorted(LLAMA_LINEAR_MODULES), "family": "llama",
                                   "default_target_modules": list(LLAMA_LINEAR_MODULES),
                                   "scaled_modules": ["k_proj", "v_proj", "down_proj"],
                                   "scaled_input_modules": ["down_proj"]}
# Another shape (no k_proj): a default that changes with it depends on the base model.
OTHER_BASE_INFO: dict[str, Any] = {
    "linear_modules": sorted(m for m in LLAMA_LINEAR_MODULES if m != "k_proj"),
    "default_target_modules": [m for m in LLAMA_LINEAR_MODULES if m != "k_proj"]}
# Training-file sizes: the one defaults are computed at, and the two that tell which defaults depend on the size.
REFERENCE_EXAMPLES = 1000
SMALL_FILE, LARGE_FILE = 1, 100_000
# Sizes the n_epochs rule is shown at.
EPOCH_EXAMPLES = (10, 50, 10_000, 20_000)


def reference_settings(**changes: Any) -> Settings:
    """The declared defaults, whatever the environment says (the pages must not depend on the machine)."""
    return Settings.model_construct(**changes)


# ------------------------------------------------------------------ rendering values


def number(value: float) -> str:
    """A number as a user would write it: 8, 0.001, 43200 (not 43200.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def code(text: str) -> str:
    return f"`{text}`"


def cell(text: str) -> str:
    """Text for a table cell: one line, pipes escaped, and outside code spans no `<` an HTML parser would take."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|")


Row = tuple[str, ...]


def table(header: Row, rows: Sequence[Row]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (as tests/test_docs_links.py checks it)."""
    text = heading.replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def bounds(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    """An accepted range in words: 1–64, > 0, ≤ 1, ≥ 1."""
    if low is not None and high is not None and not low_open and not high_open:
        return f"{number(low)}–{number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '≥'} {number(low)}")
    if high is not None:
        parts.append(f"{'<' if high_open else '≤'} {number(high)}")
    return ", ".join(parts)


def constraints(metadata: list[Any], unit: str = "items") -> str:
    """The accepted range a field's pydantic constraints (gt, ge, lt, le, max_length, ...) declare, or ""."""
    low: Any = None
    high: Any = None
    low_open = high_open = False
    lengths = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Ge):
            low, low_open = item.ge, False
        elif isinstance(item, annotated_types.Lt):
            high, high_open = item.lt, True
        elif isinstance(item, annotated_types.Le):
            high, high_open = item.le, False
        elif isinstance(item, annotated_types.MinLen):
            lengths.append(f"at least {item.min_length} {unit}")
        elif isinstance(item, annotated_types.MaxLen):
            lengths.append(f"at most {item.max_length} {unit}")
    found = [bounds(low, low_open, high, high_open)] if low is not None or high is not None else []
    return "; ".join(found + lengths)


def type_words(annotation: Any, *, drop_auto: bool = False) -> tuple[str, bool]:
    """(readable type, whether None is accepted). `drop_auto`: leave out the Literal["auto"] every hyperparameter
    accepts."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if drop_auto:
            members = [a for a in members if not (typing.get_origin(a) is typing.Literal
                                                  and typing.get_args(a) == ("auto",))]
        choices = [c for a in members if typing.get_origin(a) is typing.Literal for c in typing.get_args(a)]
        others = [type_words(a)[0] for a in members if typing.get_origin(a) is not typing.Literal]
        words = others + ([choice_words(choices)] if choices else [])
        return " or ".join(words), optional
    if origin is typing.Literal:
        return choice_words(list(typing.get_args(annotation))), False
    if origin is list:
        return f"list of {type_words(typing.get_args(annotation)[0])[0]}", False
    if origin is dict:
        return "JSON object", False
    names = {str: "text", int: "int", float: "float", bool: "bool", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))), False


def choice_words(choices: list[Any]) -> str:
    return "one of " + " | ".join(str(c) for c in choices)


# ------------------------------------------------------------------ configuration.md


def env_var(name: str) -> str:
    return (str(Settings.model_config.get("env_prefix", "")) + name).upper()


def setting_default(value: Any) -> str:
    """A setting's default as its environment variable would be written."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return code("true" if value else "false")
    if isinstance(value, int | float):
        return code(number(value))
    if isinstance(value, Path):
        return code(value.as_posix())
    if isinstance(value, list | dict):
        return code(json.dumps(value, sort_keys=True))
    return code(str(value)) if str(value) else code('""')


def setting_groups() -> list[tuple[str, list[str]]]:
    """The settings under their headings, in declaration order."""
    names = list(Settings.model_fields)
    starts = {field: heading for heading, field in SETTING_GROUPS}
    unknown = sorted(set(starts) - set(names))
    if unknown:
        raise ValueError(f"SETTING_GROUPS in app/reference.py names fields Settings does not have: {unknown}")
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        if name in starts or not groups:
            groups.append((starts.get(name, "Settings"), []))
        groups[-1][1].append(name)
    return groups


def configuration_page() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"Generated from `app/settings.py` by `{COMMAND}`: do not edit this page by hand; change the code and run "
        "the command again.",
        "",
        f"Every setting is an environment variable with the prefix `{env_var('')}`, read when a process starts "
        "(see [Configuration](../configuration.md)). Structured values are JSON. A variable left unset takes the "
        "default; the accepted range, where there is one, is checked at start-up.",
        "",
    ]
    for heading, names in setting_groups():
        rows = []
        for name in names:
            field = Settings.model_fields[name]
            words, optional = type_words(field.annotation)
            rows.append((code(env_var(name)), words + (", or unset" if optional else ""),
                         setting_default(field.get_default(call_default_factory=True)),
                         constraints(field.metadata) or "", field.description or ""))
        lines += [f"## {heading}", ""]
        lines += table(("variable", "type", "default", "accepted", "description"), rows)
        lines.append("")
    lines += ["The `adaptery` client verbs read their own variables (the API's URL and your key): see "
              "[Command line](../cli.md).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ hyperparameters.md


def resolved(method: AdapterMethod[Any], raw: dict[str, Any] | None = None, *, n_examples: int = REFERENCE_EXAMPLES,
             settings: Settings | None = None, base_info: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The values a job gets (`resolve(...).model_dump()`), or None when the request would be refused."""
    try:
        return method.resolve(raw or {}, n_examples=n_examples, settings=settings or reference_settings(),
                              base_info=base_info or LLAMA_BASE_INFO).model_dump()
    except (HyperparameterError, ValueError):
        return None


def range_declaration(field: Any) -> dict[str, Any]:
    """The range a hyperparameter field declares with bounded() (adapters/methods/base.py), as declared: its `high`
    may be the name of a setting. Empty for a field without one."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    declared = extra.get("x-range")
    return declared if isinstance(declared, dict) else {}


def accepted(field: Any) -> str:
    """A hyperparameter's declared range (a settings-named limit at its default, with the variable that sets it),
    and any other constraint its field declares."""
    found = []
    limits = declared_range(field, reference_settings())
    if limits is not None:
        low, high, low_open = limits
        text = bounds(low, low_open, high, False)
        named = range_declaration(field).get("high")
        found.append(f"{text} ({env_var(named)})" if isinstance(named, str) else text)
    unit = "characters" if str in typing.get_args(field.annotation) else "items"
    if constraints(field.metadata, unit):
        found.append(constraints(field.metadata, unit))
    return "; ".join(found) or "—"


def probes(method: AdapterMethod[Any], name: str, default: Any) -> list[Any]:
    """Values of one hyperparameter other than its default, to see which other defaults follow it."""
    field = method.hyperparameters.model_fields[name]
    members = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    values: list[Any] = []
    for member in members:
        if typing.get_origin(member) is typing.Literal:
            values += [c for c in typing.get_args(member) if c != "auto"]
        elif member is bool:
            values += [True, False]
        elif member in (int, float):
            limits = declared_range(field, reference_settings())
            if limits is not None:
                low, high, low_open = limits
                values += [(low + high) / 2 if low_open else low, high]
                values = [int(v) for v in values] if member is int else values
        elif typing.get_origin(member) is list:
            values += [[LLAMA_LINEAR_MODULES[0]], [LLAMA_LINEAR_MODULES[-1]]]
        elif member is str:
            values.append("reference")
    return [v for v in values if v != default]


def dependencies(method: AdapterMethod[Any], defaults: dict[str, Any]) -> dict[str, list[str]]:
    """For each default, what else it follows: other hyperparameters, the operator's limits, the training file's
    size ("size") and the base model ("base model"); found by resolving with each of them changed."""
    found: dict[str, list[str]] = {name: [] for name in defaults}

    def compare(other: dict[str, Any] | None, cause: str, own: str | None = None) -> None:
        for name, value in (other or {}).items():
            if name != own and name in found and value != defaults[name] and cause not in found[name]:
                found[name].append(cause)

    for name in method.hyperparameters.model_fields:
        for value in probes(method, name, defaults.get(name)):
            compare(resolved(method, {name: value}), code(name), own=name)
    for setting, low in sorted(settings_named(method).items()):  # the limit lowered as far as it may go
        compare(resolved(method, settings=reference_settings(**{setting: max(1, int(low))})), env_var(setting))
    compare(resolved(method, n_examples=SMALL_FILE), "size")
    compare(resolved(method, n_examples=LARGE_FILE), "size")
    compare(resolved(method, base_info=OTHER_BASE_INFO), "base model")
    return found


def settings_named(method: AdapterMethod[Any]) -> dict[str, float]:
    """The settings this method's declared ranges name as their high end, each with the lowest low end it bounds."""
    found: dict[str, float] = {}
    for field in method.hyperparameters.model_fields.values():
        declared = range_declaration(field)
        if isinstance(declared.get("high"), str):
            name = declared["high"]
            found[name] = min(found.get(name, declared["low"]), declared["low"])
    return found


def size_rule(name: str, method: AdapterMethod[Any]) -> str:
    """The `auto` rule of a default that depends on the training file's size, in words. The rule is read from the
    function resolve() uses, and checked against resolve() at every size where it changes (and a few more), so
    the words cannot drift from the code unnoticed."""
    rules = {"batch_size": (auto_batch_size, batch_size_words), "n_epochs": (auto_epochs, epoch_words)}
    if name not in rules:
        return "auto: depends on the training file's size"
    rule, words = rules[name]
    for n in sorted({start for start, _ in segments(rule)} | set(EPOCH_EXAMPLES) | {REFERENCE_EXAMPLES, LARGE_FILE}):
        got = (resolved(method, n_examples=n) or {}).get(name)
        if got != rule(n):
            raise RuntimeError(f"{method.name}: resolve() gives {name}={got!r} for {n} examples, not what "
                               f"{rule.__name__}() says; update size_rule() in app/reference.py")
    return words()


@lru_cache(maxsize=4)
def segments(rule: Callable[[int], int]) -> tuple[tuple[int, int], ...]:
    """(first size, value) of each run of training-file sizes with the same value, up to the largest file."""
    found: list[tuple[int, int]] = []
    for n in range(1, reference_settings().max_examples_per_file + 1):
        value = rule(n)
        if not found or found[-1][1] != value:
            found.append((n, value))
    return tuple(found)


def batch_size_words() -> str:
    runs = segments(auto_batch_size)
    if len(runs) == 1:
        return f"auto: {runs[0][1]}"
    first = f"auto: {runs[0][1]} below {runs[1][0]:,} examples"
    return ", ".join([first] + [f"{value} from {start:,}" for start, value in runs[1:]])


def epoch_words() -> str:
    """OpenAI's rule (adapters/methods/base.py auto_epochs), in words, with examples computed from it."""
    most, least = auto_epochs(1), auto_epochs(reference_settings().max_examples_per_file)
    first, *rest = EPOCH_EXAMPLES
    examples = "; ".join([f"{first:,} examples: {auto_epochs(first)} epochs"] +
                         [f"{n:,}: {auto_epochs(n)}" for n in rest])
    return (f"auto: {auto_epochs(REFERENCE_EXAMPLES)}; more for a small file, so that about 100 examples are trained "
            f"(at most {most}), fewer for a large one, so that about 25,000 are (at least {least}). E.g. {examples}")


def value_text(value: Any) -> str:
    """A hyperparameter's value as it is written in a request's JSON."""
    if isinstance(value, float):
        return code(number(value))
    return code(json.dumps(value))


def default_text(name: str, value: Any, follows: list[str], method: AdapterMethod[Any]) -> str:
    if "size" in follows:
        return size_rule(name, method)
    notes = [] if "base model" not in follows else ["for a Llama-shaped base model"]
    others = [cause for cause in follows if cause != "base model"]
    if others:
        notes.append(f"depends on {', '.join(others)}")
    return value_text(value) + (f" ({'; '.join(notes)})" if notes else "")


def hyperparameter_rows(method: AdapterMethod[Any]) -> dict[str, Row]:
    """name → (name, type, accepted, default, description) of every hyperparameter of a method."""
    defaults = resolved(method)
    if defaults is None:
        raise RuntimeError(f"{method.name}: resolve({{}}) refuses the defaults for a Llama-shaped base model")
    follows = dependencies(method, defaults)
    rows: dict[str, Row] = {}
    for name, field in method.hyperparameters.model_fields.items():
        words, _ = type_words(field.annotation, drop_auto=True)
        if name in defaults:
            default = default_text(name, defaults[name], follows[name], method)
        else:  # not stored on the job: it only changes other values
            users = [other for other, causes in follows.items() if code(name) in causes]
            default = f"— (not stored; {', '.join(code(u) for u in users)} depends on it)" if users else "—"
        rows[name] = (code(name), words, accepted(field), default, field.description or "")
    return rows


def method_heading(method: AdapterMethod[Any]) -> str:
    aliases = ", ".join(code(a) for a in method.aliases)
    return code(method.name) + (f" (also {aliases})" if aliases else "")


def summary(method: AdapterMethod[Any]) -> str:
    """The first paragraph of the method module's docstring."""
    doc = (sys.modules[type(method).__module__].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def hyperparameters_page() -> str:
    header = ("hyperparameter", "type", "accepted", "default", "description")
    rows = {name: hyperparameter_rows(method) for name, method in METHODS.items()}
    shared = TrainingHyperparameters.model_fields
    # A shared hyperparameter is listed once when every method has the same row; otherwise each method lists its own.
    uniform = {name for name in shared if len({method_rows[name] for method_rows in rows.values()}) == 1}
    lines = [
        "# Hyperparameter reference",
        "",
        f"Generated from `adapters/methods/` by `{COMMAND}`: do not edit this page by hand; change the code and run "
        "the command again.",
        "",
        "A job's hyperparameters go under `method.<type>.hyperparameters` (see [Methods](../methods.md)). Every value "
        'may be omitted or `"auto"`: the job then gets the default shown here, and the job object shows every value '
        "it resolved to. A value outside the accepted range is refused with `400` naming the field. Ranges include "
        "both ends unless marked `>`; a limit named after a setting is shown at its default, which the operator may "
        "change.",
        "",
        "Defaults that depend on the base model's structure (target modules) are given for a Llama-shaped base model "
        f"such as the default {DEFAULT_BASE_MODEL}, whose linear modules are "
        f"{', '.join(code(m) for m in LLAMA_LINEAR_MODULES)}; `GET /v1/fine_tuning/methods?model=...` gives them for "
        "any registered base model (and, with `&training_file=...`, the size-dependent ones for that file).",
        "",
    ]
    overview = []
    for name, method in METHODS.items():
        heading = method_heading(method)
        overview.append((f"[{heading}](#{slug(heading)})" + (" (the default)" if name == DEFAULT_METHOD else ""),
                         code(method.peft_type), learning_rate_text(method)))
    lines += table(("method", "PEFT type", "default learning rate"), overview)
    lines += ["", "## Shared hyperparameters", "",
              "Every method accepts these; where a default differs by method, the method's section gives it.", ""]
    first = next(iter(rows.values()))
    lines += table(header, [first[name] if name in uniform else
                            (code(name), type_words(field.annotation, drop_auto=True)[0], accepted(field),
                             "per method", field.description or "")
                            for name, field in shared.items()])
    for name, method in METHODS.items():
        facts = [f"PEFT type {code(method.peft_type)}", f"default learning rate {learning_rate_text(method)}"]
        if name == DEFAULT_METHOD:
            facts.insert(0, "The default method")
        own = [row for field, row in rows[name].items() if field not in uniform]
        lines += ["", f"## {method_heading(method)}", "", summary(method), "", "; ".join(facts) + ".", ""]
        lines += table(header, own) if own else ["Only the shared hyperparameters."]
    lines.append("")
    return "\n".join(lines)


def learning_rate_text(method: AdapterMethod[Any]) -> str:
    learning_rate = (resolved(method) or {}).get("learning_rate")
    return code(number(learning_rate)) if isinstance(learning_rate, float | int) else "—"


# ------------------------------------------------------------------ the pages


PAGES: dict[str, Callable[[], str]] = {"configuration.md": configuration_page,
                                       "hyperparameters.md": hyperparameters_page}


def render() -> dict[str, str]:
    """File name → content of every reference page."""
    return {name: page() for name, page in PAGES.items()}


def stale(folder: Path = DEFAULT_FOLDER) -> list[str]:
    """The pages in `folder` that are missing or differ from what the code renders now."""
    return [name for name, text in render().items()
            if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text]


def write(folder: Path = DEFAULT_FOLDER) -> list[str]:
    """Write every page into `folder`; returns the names of the pages that changed."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in render().items():
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8", newline="\n")
            changed.append(name)
    return changed
