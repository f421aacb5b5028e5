"""What a constrained request's output must match (vLLM's `StructuredOutputsParams`): a JSON
schema, any JSON object, a regular expression, one of several strings, or an EBNF grammar.
Exactly one is given. The engine compiles it with xgrammar (engine/grammar.py) and masks
every sampled position to the tokens that keep the output inside it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lanner.errors import InvalidRequest

MAX_SPEC_CHARS = 256 * 1024  # a larger schema or grammar is a 400, not minutes of compilation


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (an object, or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (xgrammar's dialect, GBNF-like: root ::= ...)
    json_object: bool | None = None  # any JSON object (response_format {"type": "json_object"})
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens (compact output)

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequest("structured_outputs takes exactly one of json, regex, choice, grammar or "
                                 f"json_object; got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidRequest("structured_outputs: json must be a JSON schema (an object or its text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidRequest(f"structured_outputs: {name} must be a non-empty string")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequest("structured_outputs: choice must be a non-empty list of strings")
        if self.json_object not in (None, True, False) or not isinstance(self.disable_any_whitespace, bool):
            raise InvalidRequest("structured_outputs: json_object and disable_any_whitespace must be true or false")
        if len(self.key[1]) > MAX_SPEC_CHARS:
            raise InvalidRequest(f"structured_outputs: the {self.kind} is longer than {MAX_SPEC_CHARS} characters")

    @classmethod
    def of(cls, value: Any) -> StructuredOutputsParams | None:
        """From itself, a dict of its fields (the JSON form), or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequest(f"structured_outputs must be an object, got {type(value).__name__}")
        unknown = set(value) - {*cls.KINDS, "disable_any_whitespace"}
        if unknown:
            raise InvalidRequest(f"structured_outputs: unknown fields {sorted(unknown)}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    @cached_property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal keys compile to the same grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)  # keeps property order
            return kind + ("-compact" if self.disable_any_whitespace else ""), text
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind + ("-compact" if self.disable_any_whitespace else ""), ""
        return kind, getattr(self, kind)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name
