"""Tool-call parsers: what `extract` finds in a whole output, and streams that agree with it however the output
is split into deltas; malformed output degrades to content and never raises."""
from __future__ import annotations

import json
import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.server.tool_parsers import TOOL_PARSERS, ToolCall, forced_parser

HERMES = TOOL_PARSERS["hermes"]()
LLAMA = TOOL_PARSERS["llama3_json"]()
REQUIRED = forced_parser(None)
NAMED = forced_parser("get_weather")

ARGS = '{"city": "Paris", "unit": "celsius"}'
# strings holding braces, brackets, escaped quotes, backslashes, tags and non-ASCII text; numbers and literals
TRICKY = (r'{"q": "a \"quoted\" {brace} [bracket] \\ </tool_call> <tool_call> ; ]", "é": "héllo 😀 \u00e9",'
          r' "n": [1, -2.5e3, true, false, null, {"deep": [[{}], "}"]}], "empty": ""}')
NOT_TAGS = "a < b and <tool_ca, no tag; </tool_call> alone <tool_call"
DEEP = '{"a": [' * 300 + "{}" + "]}" * 300


def hermes_block(obj: str, close: bool = True) -> str:
    return "<tool_call>\n" + obj + ("\n</tool_call>" if close else "")


def call_json(name: str, args: str, key: str = "arguments") -> str:
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "' + key + '": ' + args + "}"


def run_stream(parser, chunks: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Push the chunks and finish; check every delta's shape and the stream's `calls`; return the content sent and
    the (name, arguments) of each call as its deltas spell it."""
    stream = parser.stream()
    deltas = [delta for chunk in chunks for delta in stream.push(chunk)] + stream.finish()
    content, calls = [], []
    for delta in deltas:
        assert len(delta) == 1
        if "content" in delta:
            assert isinstance(delta["content"], str) and delta["content"]
            content.append(delta["content"])
            continue
        (entry,) = delta["tool_calls"]
        if "id" in entry:  # a call's first delta: id, type and name, no arguments yet
            assert entry["index"] == len(calls) and entry["type"] == "function"
            assert re.fullmatch(r"call_[0-9a-f]{24}", entry["id"])
            assert entry["function"]["arguments"] == "" and isinstance(entry["function"]["name"], str)
            calls.append([entry["id"], entry["function"]["name"], ""])
        else:  # then arguments only, for the call that was started last
            assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
            assert calls and entry["index"] == len(calls) - 1 and entry["function"]["arguments"]
            calls[-1][2] += entry["function"]["arguments"]
    assert [(c.id, c.name, c.arguments) for c in stream.calls] == [tuple(call) for call in calls]
    assert len({call[0] for call in calls}) == len(calls)
    return "".join(content), [(name, args) for _, name, args in calls]


def assert_agrees(parser, text: str, chunks: list[str]) -> None:
    content, calls = parser.extract(text)
    streamed_content, streamed_calls = run_stream(parser, chunks)
    assert (streamed_content or None) == content
    assert streamed_calls == [(call.name, call.arguments) for call in calls]


def splits(text: str, seed: int = 0):
    """The whole text, one character at a time, every split point in two, and random chunkings."""
    yield [text]
    yield list(text)
    rng = random.Random(seed)
    for i in range(1, len(text)) if len(text) < 1000 else rng.sample(range(1, len(text)), 300):
        yield [text[:i], text[i:]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def check(parser, text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    found_content, found_calls = parser.extract(text)
    assert found_content == content
    assert [(call.name, call.arguments) for call in found_calls] == calls
    for chunks in splits(text):
        assert_agrees(parser, text, chunks)


HERMES_CASES = [
    ("Hello, world!", "Hello, world!", []),
    ("", None, []),
    ("  \n ", None, []),
    ("  indented\n", "  indented\n", []),
    (NOT_TAGS, NOT_TAGS, []),
    (hermes_block(call_json("get_weather", ARGS)), None, [("get_weather", ARGS)]),
    ("Let me check.\n\n" + hermes_block(call_json("get_weather", ARGS)), "Let me check.", [("get_weather", ARGS)]),
    (hermes_block(call_json("a", ARGS)) + "\n" + hermes_block(call_json("b", "{}")) + "\n", None,
     [("a", ARGS), ("b", "{}")]),
    ("x" + hermes_block(call_json("a", "{}")) + "\n mid \n" + hermes_block(call_json("b", "{}")) + "\nend ",
     "xmidend ", [("a", "{}"), ("b", "{}")]),
    ("Sure " + hermes_block(call_json("f", ARGS), close=False), "Sure", [("f", ARGS)]),  # generation stopped at it
    (hermes_block(call_json("f", TRICKY)), None, [("f", TRICKY)]),
    (hermes_block(call_json("f", DEEP)), None, [("f", DEEP)]),
    (hermes_block(call_json("naïve 😀", ARGS, key="parameters")), None, [("naïve 😀", ARGS)]),
    (hermes_block('{"arguments": ' + TRICKY + ', "name": "f"}'), None, [("f", TRICKY)]),  # arguments first
    (hermes_block('{"type": "function", "name": "f", "id": {"x": ["}"]}, "arguments":{"a":1}}'), None,
     [("f", '{"a":1}')]),
    (hermes_block('{"name": "f"}'), None, [("f", "{}")]),
    (hermes_block('{"name": "f\\"\\u00e9", "arguments": {}}'), None, [('f"é', "{}")]),
    ("<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>", None, [("f", "{}")]),
    # not calls: the block stays text
    (hermes_block('{"nam": "f", "arguments": {}}'), hermes_block('{"nam": "f", "arguments": {}}'), []),
    (hermes_block("not json"), hermes_block("not json"), []),
    (hermes_block('{"name": 5, "arguments": {}}'), hermes_block('{"name": 5, "arguments": {}}'), []),
    (hermes_block('{"name": "f\\x", "arguments": {}}'), hermes_block('{"name": "f\\x", "arguments": {}}'), []),
    ("<tool_call>oops</tool_call>" + hermes_block(call_json("f", "{}")), "<tool_call>oops</tool_call>",
     [("f", "{}")]),
    ("<tool_call><tool_call>" + call_json("f", "{}"), "<tool_call>", [("f", "{}")]),
    # after a call, what is no close tag is text; a missing close tag does not hide the next call
    (hermes_block(call_json("f", "{}"), close=False) + " junk</tool_call>", "junk</tool_call>", [("f", "{}")]),
    (hermes_block(call_json("a", "{}"), close=False) + "\n" + hermes_block(call_json("b", "{}")), None,
     [("a", "{}"), ("b", "{}")]),
    (hermes_block(call_json("f", "{}"), close=False) + "\n</tool_ca", "</tool_ca", [("f", "{}")]),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text, content, calls):
    check(HERMES, text, content, calls)


LLAMA_CASES = [
    (call_json("get_weather", ARGS, key="parameters"), None, [("get_weather", ARGS)]),
    (" \n<|python_tag|> " + call_json("f", TRICKY, key="parameters"), None, [("f", TRICKY)]),
    ("<|python_tag|>" + call_json("a", ARGS) + "; " + call_json("b", "{}", key="parameters") + ";\n", None,
     [("a", ARGS), ("b", "{}")]),
    (call_json("f", DEEP, key="parameters"), None, [("f", DEEP)]),
    ('{"parameters": {"x": 1}, "name": "f"}', None, [("f", '{"x": 1}')]),
    ("The weather is nice.", "The weather is nice.", []),
    ("", None, []),
    (" \n", None, []),
    ("<|python_tag|>", "<|python_tag|>", []),
    ("<|python_tag|>print('hi')", "<|python_tag|>print('hi')", []),
    ("<|python_ta", "<|python_ta", []),
    ('{"answer": 42}', '{"answer": 42}', []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json(text, content, calls):
    check(LLAMA, text, content, calls)


@pytest.mark.parametrize("text,calls", [
    ('[{"name": "get_weather", "parameters": ' + ARGS + "}]", [("get_weather", ARGS)]),
    (' [ {"name": "a", "parameters": ' + TRICKY + '} ,\n{"name": "b", "parameters": {}} ] ',
     [("a", TRICKY), ("b", "{}")]),
])
def test_required(text, calls):
    check(REQUIRED, text, None, calls)


@pytest.mark.parametrize("text,args", [(ARGS, ARGS), (" \n" + TRICKY + "\n ", TRICKY), ("", "{}"), (DEEP, DEEP)])
def test_named(text, args):
    check(NAMED, text, None, [("get_weather", args)])


def test_registry_and_ids():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"}
    _, calls = HERMES.extract(hermes_block(call_json("f", "{}")) + hermes_block(call_json("f", "{}")))
    assert all(isinstance(c, ToolCall) and re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    assert forced_parser("f").extract("{}")[1][0].name == "f"


def test_arguments_stream_as_they_arrive():
    stream = HERMES.stream()
    assert stream.push("I'll look.\n<tool_ca") == [{"content": "I'll look."}]  # the tag's start is held back
    assert stream.push('ll>\n{"name": "get_wea') == []
    (header,) = stream.push('ther", "argu')  # the name is known once its string ends
    assert header["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert stream.push('ments": {"city": "Pa') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]}]
    assert stream.calls == []
    assert stream.push('ris"}}\n</tool_call>')[0]["tool_calls"][0]["function"] == {"arguments": 'ris"}'}
    assert [(c.name, c.arguments) for c in stream.calls] == [("get_weather", '{"city": "Paris"}')]
    assert stream.finish() == []


def test_malformed_after_the_name():
    """`extract` keeps a block that breaks after its name as text; a stream has sent the call by then, so it ends
    it with what came (an object if nothing did)."""
    for text, streamed_args in [
        (hermes_block('{"name": "f", "arguments": {"a": "trunc', close=False), '{"a": "trunc'),  # cut off
        (hermes_block('{"name": "f", "arguments": {"a": }}'), '{"a": }'),
        (hermes_block('{"name": "f", "arguments": {"a": NaN}}'), '{"a": NaN}'),
        (hermes_block('{"name": "f", "arguments": "{\\"a\\": 1}"}'), "{}"),
        (hermes_block('{"name": "f", oops}'), "{}"),
    ]:
        assert HERMES.extract(text) == (text, [])
        for chunks in splits(text):
            assert run_stream(HERMES, chunks)[1] == [("f", streamed_args)]
    for text, streamed in [(call_json("f", "{}") + " and more", ("and more", [("f", "{}")])),
                           ('  {"name": "f", "parameters": "x"}', ('"x"}', [("f", "{}")]))]:
        assert LLAMA.extract(text) == (text, [])
        assert run_stream(LLAMA, [text]) == streamed


def test_nesting_deeper_than_json_decodes():
    args = "[" * 100_000 + "]" * 100_000
    text = hermes_block('{"name": "f", "arguments": {"a": ' + args + "}}")
    assert HERMES.extract(text) == (text, [])  # json's decoder gives up: text
    assert run_stream(HERMES, [text[:50_001], text[50_001:]]) == ("", [("f", '{"a": ' + args + "}")])


NASTY = ["<tool_call>", "</tool_call>", "<tool_call>{", '{"name": "f", "arguments": {', '{"name": "f"', "}", "]",
         "[", "{", '"', "\\", '\\"', ":", ",", ";", " ", "\n", "<", "<|python_tag|>", "é😀", "name", "arguments",
         '"a"', "1", "null", "x"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(NASTY), max_size=30), st.data())
def test_never_raises(pieces, data):
    text = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for parser in (HERMES, LLAMA, REQUIRED, NAMED):
        content, calls = parser.extract(text)
        assert content is None or content.strip()
        for call in calls if parser is not NAMED else []:  # named trusts its grammar: garbage in, garbage out
            assert isinstance(json.loads(call.arguments), dict)
        run_stream(parser, chunks)
        if "<tool_call>" not in text:
            assert HERMES.extract(text)[0] == (text if text.strip() else None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12)
ARGUMENTS = st.builds(
    lambda value, ascii_only, indent, compact: json.dumps(
        value, ensure_ascii=ascii_only, indent=indent, separators=(",", ":") if compact else None),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=5), st.booleans(), st.sampled_from([None, 0, 2]),
    st.booleans())
NAMES = st.text(alphabet="abcxyz_é😀\"\\", min_size=1, max_size=8)
SPACE = st.text(alphabet=" \n\t", max_size=3)
TEXT = st.lists(st.sampled_from(list("ab \n\t{}[]\"\\:;<é😀/") + ["<tool_call", "</tool_call", "<|python"]),
                max_size=12).map("".join)


def chunked(data, text: str) -> list[str]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=len(text) // 2 + 2)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, ARGUMENTS, st.booleans(), SPACE, SPACE), max_size=3), st.lists(TEXT, min_size=4),
       st.booleans(), st.data())
def test_hermes_random_outputs(calls, texts, close_last, data):
    text, parts = texts[0], []
    for i, (name, args, args_first, space_before, space_after) in enumerate(calls):
        obj = ('{"arguments": ' + args + ', "name": ' + json.dumps(name) + "}") if args_first else call_json(name, args)
        closed = close_last or i < len(calls) - 1
        text += "<tool_call>" + space_before + obj + space_after + ("</tool_call>" if closed else "")
        text += texts[i + 1] if closed else ""
    segments = [texts[0]] + [texts[i + 1] for i in range(len(calls)) if close_last or i < len(calls) - 1]
    for i, segment in enumerate(segments):
        segment = segment.rstrip() if i < len(calls) else segment
        parts.append(segment.lstrip() if i else segment)
    content = "".join(parts)
    check_random(HERMES, text, content if content.strip() else None, [(n, a) for n, a, *_ in calls], data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, ARGUMENTS, st.sampled_from(_ARGS := ["arguments", "parameters"]), SPACE), min_size=1,
                max_size=3), SPACE, st.booleans(), st.booleans(), st.data())
def test_llama3_and_required_random_outputs(calls, space, tagged, trailing_separator, data):
    objects = [space + call_json(name, args, key) + space for name, args, key, space in calls]
    expected = [(name, args) for name, args, *_ in calls]
    text = space + ("<|python_tag|>" if tagged else "") + ";".join(objects) + (";" if trailing_separator else "")
    check_random(LLAMA, text, None, expected, data)
    check_random(REQUIRED, space + "[" + ",".join(objects) + "]" + space, None, expected, data)


def check_random(parser, text, content, calls, data):
    found_content, found_calls = parser.extract(text)
    assert (found_content, [(c.name, c.arguments) for c in found_calls]) == (content, calls)
    assert_agrees(parser, text, [text])
    assert_agrees(parser, text, list(text))
    assert_agrees(parser, text, chunked(data, text))


@pytest.mark.parametrize("parser,text", [
    (HERMES, hermes_block(call_json("f", '{"a": "' + "xy\\\"{[" * 50_000 + '"}'))),
    (HERMES, "a <b> <tool_ca " * 20_000),
    (LLAMA, call_json("f", '{"a": [' + "1, " * 100_000 + "2]}", key="parameters")),
    (LLAMA, "plain text " * 30_000),
    (REQUIRED, "[" + ",".join([call_json("f", '{"a": "b"}', key="parameters")] * 10_000) + "]"),
    (NAMED, '{"a": "' + "x" * 300_000 + '"}'),
])
def test_long_outputs_take_linear_time(parser, text):
    """Deltas of a few characters each over a few hundred thousand: quadratic work would take minutes."""
    chunks = random_chunks(text)
    began = time.perf_counter()
    assert_agrees(parser, text, chunks)
    assert time.perf_counter() - began < 20


def random_chunks(text: str, most: int = 4, seed: int = 0) -> list[str]:
    """`text` cut into deltas of 1..most characters (as a stream of tokens would bring it)."""
    rng = random.Random(seed)
    chunks, at = [], 0
    while at < len(text):
        size = rng.randint(1, most)
        chunks.append(text[at:at + size])
        at += size
    return chunks
