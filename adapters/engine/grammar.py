"""Constrained decoding for structured output: a JSON schema (or any JSON object) becomes a per-row token mask.

llguidance does the work (chosen over xgrammar and outlines; docs/serving.md has the measurement): it has no
dependencies beyond its own wheel, compiles a schema lazily (under a millisecond before the first mask, where
xgrammar compiles ahead for milliseconds per schema), and every step it takes is bounded by its parser limits, so a
tenant's schema cannot make a mask computation run away. Schemas are a tenant's input: the regex keywords
(`pattern`, `patternProperties`) and llguidance's own `x-guidance` options are refused before compiling, so
nothing a tenant sends runs as a regex.

Each row of a batch has its own OutputMatcher: it masks the row's logits to the tokens that keep the output
valid, follows the tokens the row takes, and says when the document is complete.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# JSON Schema keywords whose values are regular expressions; a tenant's schema may not use them.
REGEX_KEYWORDS = ("pattern", "patternProperties")
# llguidance's in-schema options (a whitespace regex among them) are the server's to choose, not a tenant's.
ENGINE_KEYWORDS = ("x-guidance",)
# Keywords whose values are maps of name -> schema (the names are data, the values schemas).
SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
# Keywords whose values are data, never schemas.
DATA_KEYWORDS = ("enum", "const", "default", "examples", "title", "description", "$comment")
MAX_SCHEMA_DEPTH = 64
# Compact JSON with the separators of Python's json.dumps. No free whitespace: a model that keeps emitting spaces or
# newlines could otherwise run a row to its token limit without closing the document.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


class SchemaError(ValueError):
    """A schema the server does not accept; the message names where in the schema and why, `index` which tool's
    (for tool calls)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def refused_keyword(schema: Any, path: str = "schema", depth: int = 0) -> str | None:
    """Why `schema` is refused (a regex keyword, an engine option, nesting past MAX_SCHEMA_DEPTH), or None."""
    if depth > MAX_SCHEMA_DEPTH:
        return f"{path} is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            found = refused_keyword(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in REGEX_KEYWORDS:
            return f"{path}.{key} is a regular expression; this server does not run regular expressions sent in " \
                   "requests (use enum, const, format, minLength/maxLength instead)"
        if key in ENGINE_KEYWORDS:
            return f"{path}.{key} sets the decoder's options, which are the server's to choose"
        if key in DATA_KEYWORDS:
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found = refused_keyword(sub, f"{path}.{key}.{name}", depth + 1)
                if found:
                    return found
        else:
            found = refused_keyword(value, f"{path}.{key}", depth + 1)
            if found:
                return found
    return None


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that does not say (OpenAI's strict mode:
    an answer holds the declared keys only; a pydantic model's schema leaves it out)."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DATA_KEYWORDS:
            closed[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            closed[key] = closed_objects(value)
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


_tokenizers: dict[int, tuple[Any, Any]] = {}
_tokenizers_lock = threading.Lock()


def _llg_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer, built once per tokenizer (about a second)."""
    import llguidance.hf

    with _tokenizers_lock:
        known = _tokenizers.get(id(tokenizer))
        if known is None or known[0] is not tokenizer:
            known = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids))
            _tokenizers[id(tokenizer)] = known  # holds the tokenizer, so its id is never reused meanwhile
        return known[1]


@dataclass(frozen=True)
class OutputGrammar:
    """A compiled-on-demand grammar for one request (shared by its choices), bound to one model's tokenizer."""

    grammar: str
    llg_tokenizer: Any
    vocab_size: int

    def matcher(self) -> OutputMatcher:
        import llguidance

        matcher = llguidance.LLMatcher(self.llg_tokenizer, self.grammar, log_level=0)
        if matcher.is_error():
            raise SchemaError(f"schema cannot be used: {matcher.get_error()}")
        return OutputMatcher(matcher, self.vocab_size)


def _checked(grammar: str, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> OutputGrammar:
    compiled = OutputGrammar(grammar=grammar, llg_tokenizer=_llg_tokenizer(tokenizer, vocab_size, eos_ids),
                             vocab_size=vocab_size)
    # Building one matcher compiles and checks the grammar (a separate validation pass would compile it twice): a
    # grammar that cannot start fails here, with the request, never in a running batch.
    compiled.matcher()
    return compiled


def json_grammar(tokenizer: Any, vocab_size: int, eos_ids: list[int], schema: dict[str, Any] | None, *,
                 strict: bool = False) -> OutputGrammar:
    """The grammar of JSON documents valid against `schema` (None: any JSON object; `strict`: objects hold their
    declared keys only unless they say otherwise), checked against the tokenizer before any row uses it; SchemaError
    says what is wrong."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    refused = refused_keyword(schema)
    if refused:
        raise SchemaError(refused)
    if strict:
        schema = closed_objects(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"schema is not a JSON Schema object: {exc}") from None
    return _checked(grammar, tokenizer, vocab_size, eos_ids)


def tool_call_grammar(tokenizer: Any, vocab_size: int, eos_ids: list[int],
                      functions: list[tuple[str, dict[str, Any] | None]], *, parallel: bool) -> OutputGrammar:
    """The grammar of an answer that is only tool calls (adapters/tool_calls.py's blocks): one call, or several when
    `parallel`, each of one of `functions` (name, parameters schema; None: any object) with valid arguments."""
    import llguidance

    from adapters.tool_calls import CALL_CLOSE, CALL_OPEN

    choices = []
    for index, (name, parameters) in enumerate(functions):
        refused = refused_keyword(parameters, "parameters")
        if refused:
            raise SchemaError(refused, index)
        # A function takes its declared parameters: an object that does not say otherwise is closed, as in OpenAI's
        # strict mode (schemas made from Python functions and pydantic models leave additionalProperties out, and
        # a model would otherwise be free to add arguments until its token limit).
        arguments = closed_objects(parameters) if parameters else {"type": "object", "properties": {},
                                                                     "additionalProperties": False}
        choices.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": name}, "arguments": arguments}})
    # Our own options for the embedded JSON (tenants' x-guidance was refused above).
    call = json.dumps({"anyOf": choices, "x-guidance": JSON_OPTIONS})
    repeat = ' ("\\n" call)*' if parallel else ""  # parallel calls: one block per line
    lark = (f"start: call{repeat}\n"
            f"call: {json.dumps(CALL_OPEN + chr(10))} body {json.dumps(chr(10) + CALL_CLOSE)}\n"
            f"body: %json {call}\n")
    try:
        return _checked(llguidance.LLMatcher.grammar_from_lark(lark), tokenizer, vocab_size, eos_ids)
    except SchemaError as exc:
        raise SchemaError(f"{exc} (in the tools' parameters)") from None


class OutputMatcher:
    """One row's place in its grammar: which tokens may come next, and whether the document is complete."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (one row's, over the vocabulary) with every token the grammar does not allow next at -inf."""
        if self._matcher.is_error():
            raise RuntimeError(f"structured output failed: {self._matcher.get_error()}")
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:logits.shape[-1]].astype(bool))
        return logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    def complete(self) -> bool:
        """The document is finished: the grammar allows nothing but the end."""
        return bool(self._matcher.is_stopped())
