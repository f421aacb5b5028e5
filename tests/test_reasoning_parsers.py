"""Reasoning parsers: the split of `<think>...</think>` from the answer, and streams that agree with it however
the output is split into deltas."""
from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tool_parsers import random_chunks

from lanner.server.reasoning import REASONING_PARSERS

QWEN3 = REASONING_PARSERS["qwen3"]()
R1 = REASONING_PARSERS["deepseek_r1"]()


def run_stream(parser, chunks: list[str], in_reasoning: bool | None = None) -> tuple[str | None, str | None]:
    stream = parser.stream(in_reasoning)
    pieces = [stream.push(chunk) for chunk in chunks] + [stream.finish()]
    reasoning, content = "".join(r for r, _ in pieces), "".join(c for _, c in pieces)
    first_content = next((i for i, (_, c) in enumerate(pieces) if c), len(pieces))
    assert not any(r for r, _ in pieces[first_content + 1:])  # the reasoning all comes before the answer
    return reasoning or None, content or None


def splits(text: str):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(0)
    for _ in range(10):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def check(parser, text: str, expected: tuple[str | None, str | None], in_reasoning: bool | None = None) -> None:
    assert parser.split(text, in_reasoning) == expected
    for chunks in splits(text):
        assert run_stream(parser, chunks, in_reasoning) == expected, chunks


@pytest.mark.parametrize("text,expected", [
    ("<think>\nLet me think.\n</think>\n\nThe answer.", ("\nLet me think.\n", "The answer.")),
    ("<think>unfinished", ("unfinished", None)),
    ("<think>a</thi", ("a</thi", None)),
    ("Plain answer.", (None, "Plain answer.")),
    ("", (None, None)),
    ("<thin", (None, "<thin")),
    ("<think>", (None, None)),
    ("<think></think>", (None, None)),
    ("<think>\n\n</think>\n\n", ("\n\n", None)),
    ("reasoning without its tag</think>\n\nanswer", ("reasoning without its tag", "answer")),
    ("</think>answer", (None, "answer")),
    ("<think>a</think>b</think>c", ("a", "b</think>c")),
    ("x<think>y</think>z", ("x<think>y", "z")),
    ("\n<think>a</think>b", ("\n<think>a", "b")),
    ("<think>a</think> \n\nb\n", ("a", " \n\nb\n")),  # only the newlines after the tag go
    ("<think>é😀</think>\n\n😀é", ("é😀", "😀é")),
])
def test_qwen3(text, expected):
    check(QWEN3, text, expected)


@pytest.mark.parametrize("text,expected", [
    ("Let me think.\n</think>\n\nThe answer.", ("Let me think.\n", "The answer.")),
    ("<think>\nold style</think>answer", ("\nold style", "answer")),
    ("unfinished", ("unfinished", None)),
    ("<think>unfinished", ("unfinished", None)),
    ("", (None, None)),
    ("</think>\n", (None, None)),
])
def test_deepseek_r1(text, expected):
    check(R1, text, expected)


@pytest.mark.parametrize("parser,in_reasoning,text,expected", [
    (QWEN3, False, "answer with a </think> in it", (None, "answer with a </think> in it")),
    (QWEN3, False, "<think>a</think>b", ("a", "b")),
    (QWEN3, True, "still thinking", ("still thinking", None)),
    (QWEN3, True, "thought</think>\nanswer", ("thought", "answer")),
    (R1, False, "answer", (None, "answer")),
    (R1, True, "<think>a", ("a", None)),
])
def test_in_reasoning_overrides_the_default(parser, in_reasoning, text, expected):
    check(parser, text, expected, in_reasoning)


def test_tags_and_prompts():
    assert (QWEN3.start_tag, QWEN3.end_tag, QWEN3.implicit_start) == ("<think>", "</think>", False)
    assert (R1.start_tag, R1.end_tag, R1.implicit_start) == ("<think>", "</think>", True)
    assert QWEN3.in_reasoning_after("<|im_start|>assistant\n<think>\n") is True
    assert QWEN3.in_reasoning_after("<|im_start|>assistant\n<think>\n\n</think>\n\n") is False
    assert QWEN3.in_reasoning_after("<|im_start|>assistant\n") is None


def test_stream_holds_back_only_what_may_be_a_tag():
    stream = QWEN3.stream()
    assert stream.push("<thi") == ("", "")
    assert stream.push("nk>\nStep") == ("\nStep", "")
    assert stream.push(" one</th") == (" one", "")
    assert stream.push("ink>\n") == ("", "")
    assert stream.push("\nThe answer") == ("", "The answer")
    assert stream.finish() == ("", "")
    stream = QWEN3.stream()  # no <think>: undecided until </think> or the end
    assert stream.push("abc") == ("", "")
    assert stream.push("</think>x") == ("abc", "x")
    assert QWEN3.stream(in_reasoning=False).push("abc") == ("", "abc")  # the prompt says: no waiting


TEXT = st.lists(st.sampled_from(["<think>", "</think>", "<think", "</thi", "<", "/", ">", "\n", " ", "a", "é😀"]),
                max_size=12).map("".join)


@settings(max_examples=500, deadline=None)
@given(TEXT, st.sampled_from([None, True, False]), st.data())
def test_random_outputs(text, in_reasoning, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 2)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for parser in (QWEN3, R1):
        reasoning, content = parser.split(text, in_reasoning)
        assert (reasoning or "") in text and (content or "") in text
        assert run_stream(parser, chunks, in_reasoning) == (reasoning, content)
        assert run_stream(parser, list(text), in_reasoning) == (reasoning, content)


@pytest.mark.parametrize("parser,text", [
    (QWEN3, "long answer, maybe </thin " * 20_000),  # undecided all the way
    (QWEN3, "<think>" + "long thought <" * 30_000 + "</think>\n\nanswer " * 1_000),
    (R1, "x" * 400_000),
])
def test_long_outputs_take_linear_time(parser, text):
    chunks = random_chunks(text)
    began = time.perf_counter()
    assert run_stream(parser, chunks) == parser.split(text)
    assert time.perf_counter() - began < 20
