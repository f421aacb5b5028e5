"""Tool-call parsers: a model's tool-call syntax back into OpenAI `tool_calls`, whole or as it streams.

`parser.extract(text)` gives (content, calls) for a finished output; `parser.stream()` gives a `ToolCallStream`
whose `push`/`finish` turn text deltas into chat-completion `delta` dicts. A call's `arguments` is the raw text of
its arguments object exactly as the model wrote it, so the streamed pieces add up to the same string.

`extract` is strict: a block that is not valid JSON of the expected shape stays content. A stream commits to a
call once its name is read, so a block that breaks after that (truncated, say) still ends as a call; for
well-formed output the two agree however the text is split. Model output never raises here.
"""
from __future__ import annotations

import json
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass

from lanner.server.reasoning import partial_tag

_ARGS_KEYS = ("arguments", "parameters")
_SPACE_RUN = re.compile(r"[ \t\r\n]*")  # JSON's whitespace, which str.isspace() would overshoot
_STRING_STOP = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'[][{}"]')
_SCALAR_END = re.compile(r'[][{},:" \t\r\n]')
_DECODER = json.JSONDecoder(parse_constant=int)  # int("NaN") raises: NaN and Infinity are no JSON


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _skip_space(text: str, pos: int) -> int:
    return _SPACE_RUN.match(text, pos).end()


def _content_or_none(parts: list[str]) -> str | None:
    content = "".join(parts)
    return content if content.strip() else None


def _read_call(text: str, pos: int) -> tuple[str, str, int] | None:
    """The call object `{"name": ..., "arguments": {...}}` at text[pos] as (name, raw arguments, end), or None.
    Members are decoded one by one, not the object at once, to keep the arguments' exact source text."""
    name = args = None
    try:
        if text[pos] != "{":
            return None
        pos = _skip_space(text, pos + 1)
        while True:
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_space(text, pos)
            if not isinstance(key, str) or text[pos] != ":":
                return None
            start = _skip_space(text, pos + 1)
            value, pos = _DECODER.raw_decode(text, start)
            if key == "name" and (name is None and isinstance(value, str)):
                name = value
            elif key in _ARGS_KEYS and (args is None and isinstance(value, dict)):
                args = text[start:pos]
            elif key == "name" or key in _ARGS_KEYS:
                return None
            pos = _skip_space(text, pos)
            if text[pos] == "}":
                return None if name is None else (name, args or "{}", pos + 1)
            if text[pos] != ",":
                return None
            pos = _skip_space(text, pos + 1)
    except (ValueError, IndexError, RecursionError):  # RecursionError: nested deeper than json's C scanner goes
        return None


class _ValueScanner:
    """Finds where one JSON value ends in text arriving in pieces. It tracks only strings, escapes and nesting:
    enough to know the value's extent without keeping it, not to validate it."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = self.scalar = self.started = False

    def feed(self, text: str, pos: int) -> int | None:
        """Scan text[pos:]; return the index just past the value, or None if it goes on beyond the text."""
        while pos < len(text):
            if self.escaped:
                self.escaped, pos = False, pos + 1
                continue
            if not self.started:
                self.started, self.scalar = True, text[pos] not in '{["'
            if self.scalar:  # a number, true, false or null ends where anything else starts
                match = _SCALAR_END.search(text, pos)
                return None if match is None else match.start()
            match = (_STRING_STOP if self.in_string else _STRUCTURE).search(text, pos)
            if match is None:
                return None
            pos, char = match.end(), match.group()
            if char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = not self.in_string
            else:
                self.depth += 1 if char in "[{" else -1
            if not self.in_string and self.depth <= 0:
                return pos
        return None


class _CallReader:
    """Reads one call object as it streams in, in any member order: `name` is set once read; raw arguments text
    collects in `args` for the owner to take (no arguments member reads as `{}`); `done` or `failed` ends it."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.args: list[str] = []
        self.has_args = self.done = self.failed = False
        self._expect = "{"  # the characters allowed next, after blanks; "value" for a value's first one
        self._member = ""  # what the scanner reads: "key", "name", "args" or "skip"
        self._key = ""
        self._text: list[str] = []  # the key or name string so far
        self._scanner: _ValueScanner | None = None

    def feed(self, text: str, pos: int) -> int:
        """Read text[pos:]; return where reading stopped: the end of text, just past the object, or at the
        offending character."""
        while pos < len(text) and not (self.done or self.failed):
            char = text[pos]
            if self._scanner is not None:
                end = self._scanner.feed(text, pos)
                self._take(text[pos:end], end is not None)
                pos = len(text) if end is None else end
            elif char in " \t\r\n":
                pos += 1
            elif self._expect == "value":
                member = "name" if self._key == "name" else "args" if self._key in _ARGS_KEYS else "skip"
                self.failed = (char in ",:]}" or (member == "name" and (char != '"' or self.name is not None))
                               or (member == "args" and (char != "{" or self.has_args)))
                self._member, self._scanner = member, _ValueScanner()
                self.has_args |= member == "args"
            elif char not in self._expect:
                self.failed = True
            elif char == '"':
                self._member, self._scanner = "key", _ValueScanner()
            else:
                pos, self._expect = pos + 1, {"{": '"', ":": "value", ",": '"'}.get(char, "")
                self.done, self.failed = char == "}" and self.name is not None, char == "}" and self.name is None
                if self.done and not self.has_args:
                    self.args.append("{}")
        return pos

    def _take(self, piece: str, finished: bool) -> None:
        (self.args if self._member == "args" else self._text if self._member != "skip" else []).append(piece)
        if finished:
            self._scanner, self._expect = None, ":" if self._member == "key" else ",}"
            if self._member in ("key", "name"):
                try:
                    value = json.loads("".join(self._text))
                except ValueError:
                    self.failed = True
                    return
                self._text = []
                self._key, self.name = (value, self.name) if self._member == "key" else (self._key, value)


class ToolCallStream(ABC):
    """Turns an output arriving in pieces into chat-completion `delta` dicts. Subclasses parse (`_advance`); this
    class decides what goes out, so every parser orders and merges deltas the same way."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []  # finished calls, in order
        self._buffer = ""  # text not consumed yet: only what may still become a tag
        self._pending: list[str] | None = None  # text that is content after all if no call comes of it
        self._reader = _CallReader()
        self._deltas: list[dict] = []
        self._call: ToolCall | None = None  # the call going out now
        self._call_args: list[str] = []
        self._held_space: list[str] = []  # the content's trailing whitespace: dropped if a call comes next
        self._content_started = False
        self._strip_leading = False  # whitespace right after a call is no content either

    def push(self, delta_text: str) -> list[dict]:
        if self._pending is not None:
            self._pending.append(delta_text)
        self._buffer += delta_text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        self._advance(final=True)
        self._end_call()
        held, self._held_space = "".join(self._held_space), []
        if self._content_started and held:
            self._emit_content(held)
        return self._take()

    @abstractmethod
    def _advance(self, final: bool) -> None:
        """Parse what `_buffer` holds (all of it when `final`), emitting through `_content`, `_open_call`, ..."""

    def _take(self) -> list[dict]:
        deltas, self._deltas = self._deltas, []
        return deltas

    def _content(self, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        body = text.rstrip()
        if body:
            self._emit_content("".join(self._held_space) + body)
            self._held_space, self._content_started = [text[len(body):]], True
        else:
            self._held_space.append(text)

    def _emit_content(self, text: str) -> None:
        if self._deltas and "content" in self._deltas[-1]:
            self._deltas[-1]["content"] += text
        else:
            self._deltas.append({"content": text})

    def _open_call(self, name: str) -> None:
        self._held_space, self._pending = [], None
        self._call, self._call_args = ToolCall(name, "", new_call_id()), []
        self._deltas.append({"tool_calls": [{"index": len(self.calls), "id": self._call.id, "type": "function",
                                             "function": {"name": name, "arguments": ""}}]})

    def _args(self, piece: str) -> None:
        if piece:
            self._call_args.append(piece)
            last = self._deltas[-1].get("tool_calls", [{}])[0] if self._deltas else {}
            if last.get("index") == len(self.calls) and "id" not in last:
                last["function"]["arguments"] += piece
            else:
                self._deltas.append({"tool_calls": [{"index": len(self.calls), "function": {"arguments": piece}}]})

    def _end_call(self) -> None:
        if self._call is not None:
            if not self._call_args:  # broke before its arguments: still send an object
                self._args("{}")
            self._call.arguments = "".join(self._call_args)
            self.calls.append(self._call)
            self._call, self._strip_leading = None, True

    def _read(self, text: str, pos: int, final: bool) -> tuple[int, str]:
        """Feed the call reader; (where it stopped, outcome): "done", "more" (text needed), "broken" (after its name
        went out: the call is ended) or "none" (no call: `_pending` holds the text to take as content)."""
        pos = self._reader.feed(text, pos)
        if self._call is None and self._reader.name is not None:
            self._open_call(self._reader.name)
        if self._call is not None:
            for piece in self._reader.args:
                self._args(piece)
            self._reader.args.clear()
        outcome = "done" if self._reader.done else "more" if not (self._reader.failed or final) else \
            "none" if self._call is None else "broken"
        if outcome in ("done", "broken"):
            self._end_call()
        return pos, outcome


class ToolParser(ABC):
    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output."""

    @abstractmethod
    def stream(self) -> ToolCallStream:
        """A fresh stream for one output arriving in pieces."""


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks among
    text. A block that is no such call is text like the rest; whitespace next to calls is neither."""

    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        parts, calls, segment, pos = [], [], 0, 0
        while (start := text.find(self.open_tag, pos)) != -1:
            pos = start + len(self.open_tag)
            found = _read_call(text, _skip_space(text, pos))
            if found is None:
                continue
            end = _skip_space(text, found[2])
            if text.startswith(self.close_tag, end):
                end += len(self.close_tag)  # optional: generation may stop before it; what else follows is text
            before = text[segment:start].rstrip()
            parts.append(before.lstrip() if calls else before)
            calls.append(ToolCall(found[0], found[1], new_call_id()))
            segment = pos = end
        tail = text[segment:]
        parts.append(tail.lstrip() if calls else tail)
        return _content_or_none(parts), calls

    def stream(self) -> ToolCallStream:
        return _HermesStream(self.open_tag, self.close_tag)


class _HermesStream(ToolCallStream):
    def __init__(self, open_tag: str, close_tag: str) -> None:
        super().__init__()
        self._open, self._close = open_tag, close_tag
        self._state = "text"  # or "call" (reading its JSON), "after" (the call read)

    def _advance(self, final: bool) -> None:
        buf, pos = self._buffer, 0
        while True:
            if self._state == "call":
                pos, outcome = self._read(buf, pos, final)
                if outcome == "more":
                    break
                if outcome == "none":  # the tag was text after all
                    self._content(self._open)
                    buf, pos, self._pending = "".join(self._pending), 0, None
                self._state = "text" if outcome == "none" else "after"
                continue
            if self._state == "after":  # a close tag may follow the call; anything else is text
                pos = _skip_space(buf, pos)
                if not final and self._close.startswith(buf[pos:]) and len(buf) - pos < len(self._close):
                    break
                pos += len(self._close) if buf.startswith(self._close, pos) else 0
                self._state = "text"
                continue
            found = buf.find(self._open, pos)
            end = found if found != -1 else len(buf) if final else len(buf) - partial_tag(buf, self._open, pos)
            self._content(buf[pos:end])
            if found == -1:
                pos = end
                break
            pos = found + len(self._open)
            self._state, self._reader, self._pending = "call", _CallReader(), [buf[pos:]]
        self._buffer = buf[pos:]


class _JsonCallsParser(ToolParser):
    """Calls as bare JSON objects: llama3_json's `{...}; {...}`, or a `[{...}, {...}]` array. Output of any other
    shape is content, all of it."""

    tag = ""  # an optional marker before the calls
    opener, separator, closer = "", ";", ""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls, pos = [], _skip_space(text, 0)
        if self.tag and text.startswith(self.tag, pos):
            pos = _skip_space(text, pos + len(self.tag))
        if not text.startswith(self.opener, pos):
            return _content_or_none([text]), []
        pos = _skip_space(text, pos + len(self.opener))
        while (found := _read_call(text, pos)) is not None:
            calls.append(ToolCall(found[0], found[1], new_call_id()))
            pos = _skip_space(text, found[2])
            if text.startswith(self.separator, pos):
                pos = _skip_space(text, pos + len(self.separator))
                if self.closer or pos < len(text):
                    continue
            elif self.closer:
                if not text.startswith(self.closer, pos):
                    break
                pos = _skip_space(text, pos + len(self.closer))
            if pos == len(text):
                return None, calls
            break
        return _content_or_none([text]), []

    def stream(self) -> ToolCallStream:
        return _JsonCallsStream(self)


class _JsonCallsStream(ToolCallStream):
    """Reads calls wherever they start among the parser's punctuation (and tag), which it drops: lenient where the
    shape is wrong, but a call is out before the output ends."""

    def __init__(self, parser: _JsonCallsParser) -> None:
        super().__init__()
        self._tag = parser.tag
        self._gap = re.compile("[ \t\r\n" + re.escape(parser.opener + parser.separator + parser.closer) + "]*")
        self._state = "gap"  # or "call"; "text" once it is no (more) calls
        self._pending = []  # the whole output, until a call's name is read

    def _advance(self, final: bool) -> None:
        buf, pos = self._buffer, 0
        while self._state != "text":
            if self._state == "call":
                pos, outcome = self._read(buf, pos, final)
                if outcome == "more":
                    break
                self._state = "gap" if outcome == "done" else "text"
                continue
            pos = self._gap.match(buf, pos).end()
            if self._tag and buf.startswith(self._tag, pos):
                pos += len(self._tag)
                continue
            rest = buf[pos:]
            if rest.startswith("{"):
                self._reader, self._state = _CallReader(), "call"
            elif (rest or (final and self._pending is not None)) and (final or not self._tag.startswith(rest)):
                self._state = "text"
            else:
                break
        if self._state == "text":
            if self._pending is not None:  # no call came of it: all of it is content
                buf, pos, self._pending = "".join(self._pending), 0, None
            self._content(buf[pos:])
            pos = len(buf)
        self._buffer = buf[pos:]


class Llama3JsonToolParser(_JsonCallsParser):
    """Llama 3.1 / 3.2 JSON tool calls: `{"name": ..., "parameters": {...}}`, several separated by `;`, maybe after
    `<|python_tag|>`."""

    tag = "<|python_tag|>"


class RequiredToolParser(_JsonCallsParser):
    """tool_choice "required": the grammar makes the output a JSON array of `{"name", "parameters"}` objects."""

    opener, separator, closer = "[", ",", "]"


class NamedToolParser(ToolParser):
    """tool_choice naming a function: the grammar makes the whole output that function's arguments object."""

    def __init__(self, name: str) -> None:
        self.name = name

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = _skip_space(text, 0)
        return None, [ToolCall(self.name, text[start:_ValueScanner().feed(text, start)] or "{}", new_call_id())]

    def stream(self) -> ToolCallStream:
        return _NamedStream(self.name)


class _NamedStream(ToolCallStream):
    def __init__(self, name: str) -> None:
        super().__init__()
        self._open_call(name)
        self._scanner: _ValueScanner | None = _ValueScanner()  # None once the arguments have ended

    def _advance(self, final: bool) -> None:
        buf, self._buffer = self._buffer, ""
        pos = 0 if self._call_args else _skip_space(buf, 0)
        if self._scanner is not None and pos < len(buf):
            end = self._scanner.feed(buf, pos)
            self._args(buf[pos:end])
            if end is not None:
                self._scanner = None
                self._end_call()


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def forced_parser(tool_choice_name: str | None) -> ToolParser:
    """The parser for output a grammar forced into tool calls: one named function's arguments, or (None) the
    array that tool_choice "required" asks for."""
    return RequiredToolParser() if tool_choice_name is None else NamedToolParser(tool_choice_name)
