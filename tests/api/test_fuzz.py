"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis), against the real app in
this process (schemathesis' ASGI transport), bounded and deterministic, with every check schemathesis has: no 5xx;
every status code, content type, header and body documented and matching its schema; schema-invalid requests
refused; schema-valid requests accepted.

Each operation gets positive and negative cases, as `schemathesis run` draws them. What no schema can say
about a request, the generators are taught with schemathesis' own custom formats: a training file
(format "jsonl") holds JSONL examples, an adapter archive (format "adapter-archive") a real adapter, a
webhook URL (format "webhook-url") names an address webhooks may be sent to, a base model's source (format
"base-model-source") a model folder on this host.
Admin operations are fuzzed with the admin key, the rest with a tenant's key. No worker runs in this tier: jobs and
evaluations the fuzzer creates stay queued (their messages go to the test broker).

`fuzz()` is also the measuring tool, against this app in process (`Served(app)`) or a running stack's URL, e.g.
25 examples per operation with seed 90210 against a stack started as tests/conftest.py's `stack` fixture starts one
(test keys, the tiny model):
    python -c "import tempfile; from pathlib import Path; from tests.api.test_fuzz import *
    from tests.tiny_model import tiny_model_folder
    tiny = tiny_model_folder(Path('.cache/models'))
    teach_generators(adapter_archives(tiny, Path(tempfile.mkdtemp())), tiny)
    print(fuzz('http://127.0.0.1:<port>', examples=25, seed=90210))"
"""

from __future__ import annotations

import json
import string
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks, not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup

from tests.api.adapters_made_with_peft import adapter_archives
from tests.api.conftest import Api
from tests.conftest import ADMIN_KEY, TEST_KEY

EXAMPLES_PER_OPERATION = 8


# ------------------------------------------------------------------ what no schema can say


def _words() -> st.SearchStrategy[str]:
    return st.text(string.ascii_letters + string.digits + " .,!?'", min_size=1, max_size=40).filter(str.strip)


@st.composite
def jsonl_datasets(draw: st.DrawFn) -> str:
    """A training file the server accepts: 1-6 examples in one of its four formats."""
    shape = draw(st.sampled_from(["chat", "completion", "instruction", "text"]))
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        if shape == "chat":
            line: dict[str, Any] = {"messages": [{"role": "user", "content": draw(_words())},
                                                 {"role": "assistant", "content": draw(_words())}]}
        elif shape == "completion":
            line = {"prompt": draw(_words()), "completion": draw(_words())}
        elif shape == "instruction":
            line = {"instruction": draw(_words()), "input": draw(_words()), "output": draw(_words())}
        else:
            line = {"text": draw(_words())}
        lines.append(json.dumps(line))
    return "\n".join(lines) + "\n"


def webhook_urls() -> st.SearchStrategy[str]:
    """URLs a webhook endpoint may name: http(s) on an address that is neither loopback, link-local,
    unspecified nor multicast (IP literals: this machine resolves no names)."""
    octet = st.integers(1, 254)
    address = st.one_of(st.builds("10.{}.{}.{}".format, octet, octet, octet),
                        st.builds("192.168.{}.{}".format, octet, octet),
                        st.builds("203.0.113.{}".format, octet))
    return st.builds("{}://{}:{}/{}".format, st.sampled_from(["http", "https"]), address,
                     st.integers(1, 65535), st.text(string.ascii_lowercase + "/-", max_size=20))


def teach_generators(archives: list[bytes], model_folder: Path) -> None:
    """`archives`: zips of real adapters for the base model (tests/api/adapters_made_with_peft.adapter_archives);
    `model_folder`: a base model's folder on this host, what a base-model registration names."""
    schemathesis.openapi.format("jsonl", jsonl_datasets())
    schemathesis.openapi.format("adapter-archive", st.sampled_from(archives))
    schemathesis.openapi.format("webhook-url", webhook_urls())
    schemathesis.openapi.format("base-model-source", st.just(str(model_folder)))
    # A grader's template may name {{item.…}} and {{sample.output_text}}; a multi grader's formula is arithmetic
    # (over numbers here: which names it may use depends on its graders).
    schemathesis.openapi.format("grader-template", st.one_of(_words(), st.sampled_from([
        "{{sample.output_text}}", "{{item.reference_answer}}",
        "Q: {{item.messages[0].content}} A: {{sample.output_text}}"])))
    schemathesis.openapi.format("grader-formula", st.sampled_from(["1", "0.5 * 0.5 + 0.25", "max(0.2, min(1, 2))"]))


def sends_an_archive(case: Any) -> bool:
    """Positive adapter imports send the archive: the server tells the two loose `files` apart by each part's
    file name, which no generator can set (test_adapter_import covers that way of sending)."""
    return case.operation.label != "POST /v1/adapters" or (isinstance(case.body, dict) and "files" not in case.body)


def _message_fits_its_role(message: Any) -> bool:
    """A chat message's fields that depend on its role: tool_call_id on tool messages only, tool_calls on assistant
    messages only (each call's arguments a JSON object as text), content null only beside tool_calls."""
    if not isinstance(message, dict):
        return True
    role = message.get("role")
    if ("tool_call_id" in message and message["tool_call_id"] is not None) != (role == "tool"):
        return False
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        return False
    if message.get("content") is None and not (role == "assistant" and calls):
        return False
    for call in calls or []:
        try:
            if not isinstance(json.loads(call["function"]["arguments"]), dict):
                return False
        except (ValueError, TypeError, KeyError):
            return False
    return True


def _tool_fields_fit(body: dict[str, Any]) -> bool:
    """tool_choice other than none/auto needs tools, a named one one of them; the functions' names differ; tools
    with a JSON response_format are refused."""
    tools = body.get("tools") or []
    names = [tool.get("function", {}).get("name") for tool in tools if isinstance(tool, dict)]
    choice = body.get("tool_choice")
    if len(set(names)) != len(names):
        return False
    if choice not in (None, "none", "auto") and not tools:
        return False
    if isinstance(choice, dict) and choice.get("function", {}).get("name") not in names:
        return False
    response_format = body.get("response_format")
    return not (tools and choice != "none" and isinstance(response_format, dict)
                and response_format.get("type") not in (None, "text"))


def _graders_fit(graders: Any) -> bool:
    """Graders' rules that link fields: names differ, a score range is [low, high] with low < high, a multi grader's
    graders are not named as its formula's functions."""
    from adapters.graders import FORMULA_FUNCTIONS

    if not isinstance(graders, list):
        return True
    names = [g.get("name") for g in graders if isinstance(g, dict)]
    if len(set(names)) != len(names):
        return False
    for grader in graders:
        inner = grader.get("graders") if isinstance(grader, dict) else None
        for one in [grader, *(inner.values() if isinstance(inner, dict) else [])]:
            span = one.get("range") if isinstance(one, dict) else None
            if isinstance(span, list) and len(span) == 2 and not span[0] < span[1]:
                return False
        if isinstance(inner, dict) and set(inner) & set(FORMULA_FUNCTIONS):
            return False
    return True


def _lines_fit(lines: Any) -> bool:
    """A preference or feedback line's linked rules (a system message only first, the conversation ends with the
    user, two different answers; one format for all lines) are the upload's line checks."""
    from adapters.data import check_record, detect_format

    if not isinstance(lines, list):
        return True
    formats = {detect_format(line) for line in lines if isinstance(line, dict)}
    return len(formats) <= 1 and all(fmt in ("preference", "feedback") and check_record(line, fmt) is None
                                     for line in lines if isinstance(line, dict) for fmt in formats)


def keeps_linked_fields(case: Any) -> bool:
    """OpenAI's rules that link fields (top_logprobs needs logprobs: true; best_of, if given, equals n here; a chat
    message's fields follow its role; tool_choice names one of the tools; graders' names differ; feedback lines
    follow the upload's line rules) are not in a form
    of the request schema the generators follow; positive cases keep to them (test_inference, test_tools and
    test_evaluations check the 400 that names each otherwise)."""
    body = case.body if isinstance(case.body, dict) else {}
    if case.operation.label == "POST /v1/chat/completions":
        return ((not body.get("top_logprobs") or body.get("logprobs") is True)
                and all(_message_fits_its_role(m) for m in body.get("messages") or [])
                and _tool_fields_fit(body))
    if case.operation.label == "POST /v1/feedback":
        return _lines_fit(body.get("lines"))
    if case.operation.label in ("POST /v1/evaluations", "POST /v1/fine_tuning/jobs"):
        return _graders_fit(body.get("graders"))
    if case.operation.label == "POST /v1/completions":
        return body.get("best_of") is None or body.get("best_of") == body.get("n", 1)
    return True


def not_ready_for_want_of_a_worker(case: Any, response: Any) -> bool:
    """GET /ready's documented 503 when every check passes but the worker's: the right answer where no worker
    runs, as in this tier (the end-to-end tier, with workers, gets its 200)."""
    if case.operation.label != "GET /ready" or response.status_code != 503:
        return False
    checks = response.json()["checks"]
    return [name for name, check in checks.items() if not check["ok"]] == ["worker"]


# ------------------------------------------------------------------ the app, served


@dataclass
class Served:
    """The app as a server runs it: an unhandled error is the 500 the client gets (Starlette has sent it), kept
    here with its traceback rather than raised into the caller, which schemathesis' ASGI transport would do.
    Its lifespan is not run again: the module's `api` runs the app's."""

    app: Callable[..., Awaitable[None]]
    errors: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            self.errors.append(f"{scope['method']} {scope['path']}: {traceback.format_exc()}")
            if not started:
                raise


# ------------------------------------------------------------------ the run


@dataclass
class Report:
    operations: int = 0
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[str]] = field(default_factory=dict)  # "positive 200" → count
    failures: Counter[str] = field(default_factory=Counter)  # failing responses per check
    found: Counter[str] = field(default_factory=Counter)  # failing responses per "<operation> <check> <status>"
    examples: dict[str, str] = field(default_factory=dict)  # the same keys → the first failure's message
    server_errors: list[str] = field(default_factory=list)  # tracebacks of unhandled errors (in process only)
    not_ready: int = 0  # GET /ready's 503s for want of a worker alone (no 5xx check on them)

    def figures(self) -> dict[str, int]:
        return {"5xx responses": sum(n for status, n in self.statuses.items() if status >= 500) - self.not_ready,
                "not ready for want of a worker": self.not_ready,
                "undocumented status codes": self.failures["status_code_conformance"],
                "schema-valid requests refused": self.failures["positive_data_acceptance"],
                "response-schema violations": self.failures["response_schema_conformance"]}

    def __str__(self) -> str:
        statuses = dict(sorted(self.statuses.items()))
        lines = [f"{self.operations} operations, {self.requests} requests, by status: {statuses}",
                 f"failing responses by check: {dict(self.failures) or 'none'}",
                 *(f"{name}: {count}" for name, count in self.figures().items())]
        lines += [f"  {label}: {dict(sorted(counts.items()))}" for label, counts in self.by_operation.items()]
        lines += [f"  {key} (x{self.found[key]}): {text}" for key, text in sorted(self.examples.items())]
        lines += [f"server error: {error}" for error in self.server_errors[:3]]
        return "\n".join(lines)


def _schema(target: str | Served, key: str) -> Any:
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": key}}}})
    if isinstance(target, str):
        return schemathesis.openapi.from_url(f"{target}/openapi.json", config=config)
    return schemathesis.openapi.from_asgi("/openapi.json", target, config=config)


def fuzz(target: str | Served, *, examples: int, seed: int | None = None) -> Report:
    """Every operation of the app `target` serves (in process) or of a running stack at that base URL, `examples`
    cases each (positive and negative), every check on every response. Without a seed the run is derandomised:
    the same cases every time."""
    load_all_checks()
    checks = list(CHECKS.get_all())
    report = Report()
    keys = {"tenant": TEST_KEY, "admin": ADMIN_KEY}
    schemas = {who: _schema(target, key) for who, key in keys.items()}
    # Over HTTP, the base URL; in process, the ASGI transport reaches the app the schema was loaded from.
    transport = {"base_url": target} if isinstance(target, str) else {}
    for result in schemas["tenant"].get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/v1/admin/"):
            operation = schemas["admin"][operation.path][operation.method.upper()]
        report.operations += 1
        positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE).filter(sends_an_archive) \
            .filter(keeps_linked_fields)
        strategy = st.one_of(positive, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @given(case=strategy)
        @settings(max_examples=examples, deadline=None, derandomize=seed is None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(**transport)
            report.requests += 1
            report.statuses[response.status_code] += 1
            mode = case.meta.generation.mode.value if case.meta else "explicit"
            report.by_operation.setdefault(case.operation.label, Counter())[f"{mode} {response.status_code}"] += 1
            excluded = []
            if not_ready_for_want_of_a_worker(case, response):
                report.not_ready += 1
                excluded.append(not_a_server_error)
            try:
                case.validate_response(response, checks=checks, excluded_checks=excluded,
                                       transport_kwargs=dict(transport))
            except (Failure, FailureGroup) as exc:
                # Counted, not raised: every case runs, and hypothesis does not shrink towards one failure.
                for failure in exc.exceptions if isinstance(exc, FailureGroup) else [exc]:
                    check = type(failure).checks[0] if type(failure).checks else type(failure).__name__
                    report.failures[check] += 1
                    key = f"{case.operation.label} {check} {response.status_code}"
                    report.found[key] += 1
                    report.examples.setdefault(key, f"{failure.title}: {failure.message} | {response.text[:300]}")

        (hypothesis.seed(seed)(run) if seed is not None else run)()
    if not isinstance(target, str):
        report.server_errors = list(target.errors)
    return report


def test_every_check_passes_on_every_operation(api: Api, tiny_model_dir: Path,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    teach_generators(adapter_archives(tiny_model_dir, tmp_path_factory.mktemp("archives")), tiny_model_dir)
    report = fuzz(Served(api.client.app), examples=EXAMPLES_PER_OPERATION)
    print(report)
    assert report.operations >= 20 and report.requests >= report.operations * 4
    # The taught generators reach the happy paths, not only refusals.
    for label in ("POST /v1/files", "POST /v1/adapters"):
        assert report.by_operation[label]["positive 200"] > 0, str(report)
    assert not report.failures and not report.server_errors, str(report)
