"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis), bounded and
deterministic, with every check schemathesis has: no 5xx; every status code, content type, header and
body documented and matching its schema; schema-invalid requests refused; schema-valid requests accepted.

Each operation gets positive and negative cases, as `schemathesis run` draws them. What no schema can say
about a request, the generators are taught with schemathesis' own custom formats: a training file
(format "jsonl") holds JSONL examples, an adapter archive (format "adapter-archive") a real adapter, a
webhook URL (format "webhook-url") names an address webhooks may be sent to.
Admin operations are fuzzed with the admin key, the rest with a tenant's key.

`fuzz()` is also the measuring tool, e.g. 25 examples per operation with seed 90210 against a running stack
started as tests/conftest.py's `stack` fixture starts one (test keys, the tiny model):
    python -c "from pathlib import Path; from tests.e2e.test_fuzz import *
    from tests.tiny_model import tiny_model_folder
    teach_generators(adapter_archives(tiny_model_folder(Path('.cache/models'))))
    print(fuzz('http://127.0.0.1:<port>', examples=25, seed=90210))"
"""

from __future__ import annotations

import io
import json
import string
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import Failure, FailureGroup

from tests.conftest import ADMIN_KEY, TEST_KEY, Stack

EXAMPLES_PER_OPERATION = 8
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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


def adapter_archives(tiny_model_dir: Path, count: int = 2) -> list[bytes]:
    """Zips of real LoRA adapters for the test base model (random, non-zero weights), made with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    archives = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as zipped:
                for name in ADAPTER_FILES:
                    zipped.write(Path(folder) / name, arcname=name)
        archives.append(buffer.getvalue())
    return archives


def webhook_urls() -> st.SearchStrategy[str]:
    """URLs a webhook endpoint may name: http(s) on an address that is neither loopback, link-local,
    unspecified nor multicast (IP literals: this machine resolves no names)."""
    octet = st.integers(1, 254)
    address = st.one_of(st.builds("10.{}.{}.{}".format, octet, octet, octet),
                        st.builds("192.168.{}.{}".format, octet, octet),
                        st.builds("203.0.113.{}".format, octet))
    return st.builds("{}://{}:{}/{}".format, st.sampled_from(["http", "https"]), address,
                     st.integers(1, 65535), st.text(string.ascii_lowercase + "/-", max_size=20))


def teach_generators(archives: list[bytes]) -> None:
    schemathesis.openapi.format("jsonl", jsonl_datasets())
    schemathesis.openapi.format("adapter-archive", st.sampled_from(archives))
    schemathesis.openapi.format("webhook-url", webhook_urls())


def sends_an_archive(case: Any) -> bool:
    """Positive adapter imports send the archive: the server tells the two loose `files` apart by each part's
    file name, which no generator can set (test_adapter_import covers that way of sending)."""
    return case.operation.label != "POST /v1/adapters" or (isinstance(case.body, dict) and "files" not in case.body)


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

    def figures(self) -> dict[str, int]:
        return {"5xx responses": sum(n for status, n in self.statuses.items() if status >= 500),
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
        return "\n".join(lines)


def fuzz(base_url: str, *, examples: int, seed: int | None = None) -> Report:
    """Every operation, `examples` cases each (positive and negative), every check on every response.
    Without a seed the run is derandomised: the same cases every time."""
    load_all_checks()
    checks = list(CHECKS.get_all())
    report = Report()
    keys = {"tenant": TEST_KEY, "admin": ADMIN_KEY}
    schemas = {who: schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=schemathesis.Config.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": key}}}})) for who, key in keys.items()}
    for result in schemas["tenant"].get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/v1/admin/"):
            operation = schemas["admin"][operation.path][operation.method.upper()]
        report.operations += 1
        positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE).filter(sends_an_archive)
        strategy = st.one_of(positive, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @given(case=strategy)
        @settings(max_examples=examples, deadline=None, derandomize=seed is None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(base_url=base_url)
            report.requests += 1
            report.statuses[response.status_code] += 1
            mode = case.meta.generation.mode.value if case.meta else "explicit"
            report.by_operation.setdefault(case.operation.label, Counter())[f"{mode} {response.status_code}"] += 1
            try:
                case.validate_response(response, checks=checks, transport_kwargs={"base_url": base_url})
            except (Failure, FailureGroup) as exc:
                # Counted, not raised: every case runs, and hypothesis does not shrink towards one failure.
                for failure in exc.exceptions if isinstance(exc, FailureGroup) else [exc]:
                    check = type(failure).checks[0] if type(failure).checks else type(failure).__name__
                    report.failures[check] += 1
                    key = f"{case.operation.label} {check} {response.status_code}"
                    report.found[key] += 1
                    report.examples.setdefault(key, f"{failure.title}: {failure.message} | {response.text[:300]}")

        (hypothesis.seed(seed)(run) if seed is not None else run)()
    return report


def test_every_check_passes_on_every_operation(stack: Stack, tiny_model_dir: Path) -> None:
    teach_generators(adapter_archives(tiny_model_dir))
    report = fuzz(stack.base_url, examples=EXAMPLES_PER_OPERATION)
    print(report)
    assert report.operations >= 20 and report.requests >= report.operations * 4
    # The taught generators reach the happy paths, not only refusals.
    for label in ("POST /v1/files", "POST /v1/adapters"):
        assert report.by_operation[label]["positive 200"] > 0, str(report)
    assert not report.failures, str(report)
