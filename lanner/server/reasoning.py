"""Reasoning parsers: split a thinking model's `<think>...</think>` reasoning from its answer, whole or as it
streams (vLLM's `--reasoning-parser qwen3` and `deepseek_r1`).

The reasoning is the text before the first `</think>`, less a `<think>` that opens the output; the content is the
text after it, less the newlines the chat template puts there. Without `</think>` the parsers differ: qwen3 calls
the output reasoning (unfinished) only if it opens with `<think>`, deepseek_r1 always does, since its template
opens the reasoning in the prompt.

qwen3 also counts a `</think>` with no `<think>` before it, so text that does not open with `<think>` is undecided
until `</think>` or the end: a stream holds it back. Callers that know how the prompt ends avoid that wait by
passing `in_reasoning` (see `ReasoningParser.in_reasoning_after`).
"""
from __future__ import annotations

from lanner.engine.grammar import REASONING_TAGS


class ReasoningParser:
    start_tag, end_tag = REASONING_TAGS["qwen3"]  # the engine's grammars start after end_tag
    implicit_start = False  # the prompt opens the reasoning: output is reasoning until end_tag

    def split(self, text: str, in_reasoning: bool | None = None) -> tuple[str | None, str | None]:
        """(reasoning, content), None where empty. in_reasoning: whether the output starts inside reasoning, as the
        prompt left it; None to infer it from the output."""
        opened = text.startswith(self.start_tag)
        body = text[len(self.start_tag):] if opened else text
        reasoning, end, content = body.partition(self.end_tag)
        if opened or (self.implicit_start or bool(end) if in_reasoning is None else in_reasoning):
            return reasoning or None, content.lstrip("\n") or None
        return None, text or None

    def stream(self, in_reasoning: bool | None = None) -> ReasoningStream:
        return ReasoningStream(self, in_reasoning)

    def in_reasoning_after(self, prompt: str) -> bool | None:
        """Whether a rendered prompt leaves the model inside reasoning (its last tag is start_tag, as with Qwen3
        thinking templates), outside it (end_tag: Qwen3 with thinking off), or None (no tag)."""
        start, end = prompt.rfind(self.start_tag), prompt.rfind(self.end_tag)
        return None if start == end else start > end


class Qwen3ReasoningParser(ReasoningParser):
    pass


class DeepSeekR1ReasoningParser(ReasoningParser):
    start_tag, end_tag = REASONING_TAGS["deepseek_r1"]
    implicit_start = True


def partial_tag(text: str, tag: str, start: int = 0) -> int:
    """Length of the longest proper prefix of `tag` that text[start:] ends with: text that may yet become the
    tag (held back by a stream)."""
    return next((n for n in range(min(len(tag) - 1, len(text) - start), 0, -1) if text.endswith(tag[:n])), 0)


class ReasoningStream:
    """`push(delta)` and `finish()` give (reasoning piece, content piece); all of both is out after `finish()`."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool | None) -> None:
        self._start, self._end = parser.start_tag, parser.end_tag
        self._default = parser.implicit_start if in_reasoning is None else in_reasoning
        self._infer = in_reasoning is None and not parser.implicit_start
        self._state = "start"  # then "undecided", "reasoning", "newlines" (after end_tag) or "content"
        self._buffer = ""  # text held back: a possible tag, or all while undecided
        self._undecided: list[str] = []  # kept as pieces: joining on every push would be quadratic

    def push(self, delta: str) -> tuple[str, str]:
        return self._advance(delta, final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance("", final=True)

    def _advance(self, delta: str, final: bool) -> tuple[str, str]:
        if self._state == "undecided":
            window = self._buffer + delta  # the end of what came before, where a split end_tag may start
            self._undecided.append(delta)
            if self._end not in window and not final:
                self._buffer = window[-(len(self._end) - 1):]
                return "", ""
            text, self._undecided = "".join(self._undecided), []
            self._state = "reasoning" if self._end in window else "content"
        else:
            text = self._buffer + delta
        self._buffer = ""
        if self._state == "start":
            if not final and len(text) < len(self._start) and self._start.startswith(text):
                self._buffer = text
                return "", ""
            if text.startswith(self._start):
                text, self._state = text[len(self._start):], "reasoning"
            elif self._infer:
                self._state = "undecided"
                return self._advance(text, final)
            else:
                self._state = "reasoning" if self._default else "content"
        reasoning = ""
        if self._state == "reasoning":
            reasoning, found, text = text.partition(self._end)
            if not found:
                held = 0 if final else partial_tag(reasoning, self._end)
                self._buffer = reasoning[len(reasoning) - held:]
                return reasoning[:len(reasoning) - held], ""
            self._state = "newlines"
        if self._state == "newlines":
            text = text.lstrip("\n")
            self._state = "content" if text else "newlines"
        return reasoning, text


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {"qwen3": Qwen3ReasoningParser,
                                                       "deepseek_r1": DeepSeekR1ReasoningParser}
