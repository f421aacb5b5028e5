"""Engine outputs -> OpenAI response bodies and stream chunks, for completions and chat.

A stream gets DELTA outputs: each chunk carries what its output brought, and the
shaper counts what it has sent (for text offsets and usage). A whole body comes from
FINAL_ONLY outputs: `add()` keeps them and `final()` builds the body at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lanner.core.request import CompletionOutput, Logprob, RequestOutput, merge_completions


@dataclass
class PromptInfo:
    """What the server knows of one prompt before it runs."""
    token_ids: list[int]
    echo_text: str = ""  # what `echo` puts before the output ("" without echo)


@dataclass
class _Sent:
    text: int = 0
    tokens: int = 0
    started: bool = False
    held: list[CompletionOutput] = field(default_factory=list)  # deltas that came before it could start


def token_bytes(lp: Logprob) -> list[int]:
    return list(lp.token_bytes if lp.token_bytes is not None else (lp.decoded_token or "").encode())


def top_entries(entry: dict, n: int) -> list[tuple[int, Logprob]]:
    """The n most likely tokens of a logprobs entry, by rank (the sampled one is the entry's first)."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= n), key=lambda x: x[1].rank)[:n]


def prompt_logprobs_json(entries: list[dict | None] | None, n: int | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} with the prompt's token and the n most likely."""
    if entries is None or n is None:
        return None
    out = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        chosen = next(iter(entry.items()))
        kept = dict([chosen, *top_entries(entry, n)])
        out.append({str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                    for t, lp in kept.items()})
    return out


class _Shaper:
    chunk_object = ""

    def __init__(self, rid: str, model: str, body: Any, prompts: list[PromptInfo], decode_token) -> None:
        self.rid, self.model, self.body, self.prompts = rid, model, body, prompts
        self.decode_token = decode_token  # token id -> text, for tokens without a decoded form
        self.created = int(time.time())
        self.sent: dict[int, _Sent] = {}
        self.finals: dict[int, CompletionOutput] = {}
        self.prompt_logprobs: dict[int, list | None] = {}
        self.hide_output = getattr(body, "max_tokens", None) == 0  # echo-only scoring of the prompt

    def routing(self, c: CompletionOutput) -> dict:
        """The extension field of return_routed_experts: per token of the choice (or of this chunk)."""
        return {"routed_experts": c.routed_experts} if self.body.return_routed_experts else {}

    def _choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.body.n + sample_index

    def token_text(self, token_id: int, lp: Logprob | None) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return lp.decoded_token if lp is not None and lp.decoded_token is not None else self.decode_token(token_id)

    def visible(self, c: CompletionOutput) -> tuple[str, list[int], list[dict]]:
        if self.hide_output:
            return "", [], []
        return c.text, c.token_ids, c.logprobs or []

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        """A whole (FINAL_ONLY) output, for final()."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        if out.finished:
            for c in out.outputs:
                self.finals[self._choice_index(prompt_index, c.index)] = c

    def _prompt_scored(self, prompt_index: int) -> bool:
        """All the prompt logprobs the first chunk must carry have arrived."""
        have = len(self.prompt_logprobs.get(prompt_index) or [])
        return not self.shows_prompt_logprobs or have >= len(self.prompts[prompt_index].token_ids)

    @property
    def shows_prompt_logprobs(self) -> bool:
        return self.body.prompt_logprobs is not None

    def usage(self, completion_tokens: int | None = None) -> dict:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        if completion_tokens is None:
            completion_tokens = sum(len(self.visible(c)[1]) for c in self.finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        """Stream chunks for a DELTA output."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs.setdefault(prompt_index, []).extend(out.prompt_logprobs)
        chunks = []
        for c in out.outputs:
            index = self._choice_index(prompt_index, c.index)
            sent = self.sent.setdefault(index, _Sent())
            if not sent.started and not self._prompt_scored(prompt_index):
                sent.held.append(c)  # a chunked prompt's logprobs arrive over several steps: send them whole
                continue
            if sent.held:
                c, sent.held = merge_completions([*sent.held, c]), []
            text, token_ids, logprobs = self.visible(c)
            # a chunk for every step that made tokens, even with no new text (text held back by a
            # stop string or a partial UTF-8 character, or no tokenizer), so clients see each token
            if text or logprobs or token_ids or c.finish_reason or not sent.started:
                chunk = self.chunk(prompt_index, index, text, logprobs, c, sent)
                sent.text, sent.tokens, sent.started = sent.text + len(text), sent.tokens + len(token_ids), True
                if self.body.continuous_usage:
                    chunk["usage"] = self.usage(self.tokens_sent())
                chunks.append(chunk)
        return chunks

    def tokens_sent(self) -> int:
        return sum(s.tokens for s in self.sent.values())

    def closing_chunks(self) -> list[dict]:
        if not self.body.include_usage:
            return []
        return [{"id": self.rid, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [], "usage": self.usage(self.tokens_sent())}]


class CompletionShaper(_Shaper):
    chunk_object = "text_completion"

    @property
    def shows_prompt_logprobs(self) -> bool:
        return self.body.prompt_logprobs is not None or (self.body.echo and self.body.logprobs is not None)

    def logprobs(self, entries: list[dict | None], token_ids: list[int], text_offset: int) -> dict | None:
        """OpenAI's completion logprobs over entries (None: a token with no logprob, the
        prompt's first); `token_ids` names the token of each entry."""
        if self.body.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry is not None else None
            text = self.token_text(token_id, chosen)
            out["tokens"].append(text)
            out["token_logprobs"].append(chosen.logprob if chosen is not None else None)
            if entry is None:
                out["top_logprobs"].append(None)
            else:
                top = {self.token_text(t, lp): lp.logprob for t, lp in top_entries(entry, self.body.logprobs)}
                top.setdefault(text, chosen.logprob)  # the chosen token is always listed
                out["top_logprobs"].append(top)
            out["text_offset"].append(text_offset)
            text_offset += len(text)
        return out

    def _echo(self, prompt_index: int) -> tuple[str, list[dict | None], list[int]]:
        """Text, logprob entries and token ids that echo puts before the output."""
        if not self.body.echo:
            return "", [], []
        prompt = self.prompts[prompt_index]
        entries = list(self.prompt_logprobs.get(prompt_index) or [None] * len(prompt.token_ids))
        return prompt.echo_text, entries, prompt.token_ids

    def _choice(self, prompt_index: int, index: int, text: str, entries: list[dict], c: CompletionOutput,
                echo: tuple, text_offset: int, with_prompt_logprobs: bool) -> dict:
        echo_text, echo_entries, echo_tokens = echo
        tokens = [next(iter(e)) for e in entries]  # the sampled token comes first
        choice = {"index": index, "text": echo_text + text,
                  "logprobs": self.logprobs(echo_entries + entries, echo_tokens + tokens, text_offset),
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, **self.routing(c)}
        if with_prompt_logprobs and self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_json(self.prompt_logprobs.get(prompt_index),
                                                             self.body.prompt_logprobs)
        return choice

    def chunk(self, prompt_index, index, delta, new_logprobs, c, sent) -> dict:
        echo = self._echo(prompt_index) if not sent.started else ("", [], [])
        offset = len(self.prompts[prompt_index].echo_text) + sent.text if sent.started else 0
        choice = self._choice(prompt_index, index, delta, new_logprobs, c, echo, offset, not sent.started)
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def final(self) -> dict:
        choices = []
        for index, c in sorted(self.finals.items()):
            prompt_index = index // self.body.n
            text, _, logprobs = self.visible(c)
            choices.append(self._choice(prompt_index, index, text, logprobs, c, self._echo(prompt_index), 0, True))
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


@dataclass
class Reading:
    """How a chat reply's text is read: reasoning first (a reasoning parser, and whether the prompt
    left the model inside its reasoning), then tool calls (a parser maker: none, the server's
    --tool-call-parser, or the forced call's)."""
    reasoning: Any = None
    in_reasoning: bool | None = None
    tools: Any = None
    parallel_tools: bool = True


def whole_message(r: Reading, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """A finished choice's text -> an OpenAI message (content, reasoning_content, tool_calls);
    finish_reason "tool_calls" where the reply is tool calls."""
    reasoning, content = r.reasoning.split(text, r.in_reasoning) if r.reasoning else (None, text)
    message = {"content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if r.tools and content is not None:
        content, calls = r.tools().extract(content)
        calls = calls if r.parallel_tools else calls[:1]
        if calls:
            message["content"] = content
            message["tool_calls"] = [{"id": t.id, "type": "function",
                                      "function": {"name": t.name, "arguments": t.arguments}} for t in calls]
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return message, finish_reason


class ChatReader:
    """One streamed choice's text -> the deltas of its OpenAI message (as `whole_message` reads it whole)."""

    def __init__(self, reading: Reading):
        self.reading = reading
        self.thinking = reading.reasoning.stream(reading.in_reasoning) if reading.reasoning else None
        self.calls = reading.tools().stream() if reading.tools else None
        self.num_calls = 0

    def push(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The delta of new text (and of what was held back, once the choice finishes)."""
        reasoning, content = self.thinking.push(text) if self.thinking else ("", text)
        if finish_reason is not None and self.thinking:
            more = self.thinking.finish()
            reasoning, content = reasoning + more[0], content + more[1]
        message: dict[str, Any] = {}
        if reasoning:
            message["reasoning_content"] = reasoning
        if self.calls is None:
            if content or not reasoning:
                message["content"] = content
            return message, finish_reason
        deltas = self.calls.push(content) + (self.calls.finish() if finish_reason is not None else [])
        texts = [d["content"] for d in deltas if "content" in d]
        calls = [call for d in deltas for call in d.get("tool_calls", ())
                 if self.reading.parallel_tools or call["index"] == 0]
        if texts or not (reasoning or calls):
            message["content"] = "".join(texts)
        if calls:
            message["tool_calls"] = calls
            self.num_calls = max(self.num_calls, 1 + max(call["index"] for call in calls))
        if finish_reason == "stop" and self.num_calls:
            finish_reason = "tool_calls"
        return message, finish_reason


class ChatShaper(_Shaper):
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args, reading: Reading | None = None) -> None:
        super().__init__(*args)
        self.reading = reading or Reading()
        self.readers: dict[int, ChatReader] = {}

    def logprobs(self, entries: list[dict]) -> dict | None:
        if not self.body.logprobs:
            return None
        content = []
        for entry in entries:
            token_id, chosen = next(iter(entry.items()))  # the sampled token comes first
            top = [{"token": self.token_text(t, lp), "logprob": lp.logprob, "bytes": self._bytes(t, lp)}
                   for t, lp in top_entries(entry, self.body.top_logprobs or 0)]
            content.append({"token": self.token_text(token_id, chosen), "logprob": chosen.logprob,
                            "bytes": self._bytes(token_id, chosen), "top_logprobs": top})
        return {"content": content}

    def _bytes(self, token_id: int, lp: Logprob) -> list[int]:
        return list(f"token_id:{token_id}".encode()) if self.body.return_tokens_as_token_ids else token_bytes(lp)

    def _prompt_logprobs(self) -> list | None:
        return prompt_logprobs_json(self.prompt_logprobs.get(0), self.body.prompt_logprobs)

    def chunk(self, prompt_index, index, delta, new_logprobs, c, sent) -> dict:
        if not sent.started:  # the first chunk of a choice: its role, and what echo puts first
            delta = self.prompts[prompt_index].echo_text + delta
        message, finish_reason = self.readers.setdefault(index, ChatReader(self.reading)).push(delta, c.finish_reason)
        if not sent.started:
            message = {"role": "assistant", **message}
        chunk = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "delta": message, "logprobs": self.logprobs(new_logprobs),
                              "finish_reason": finish_reason, **self.routing(c)}]}
        if not sent.started and self.body.prompt_logprobs is not None:
            chunk["prompt_logprobs"] = self._prompt_logprobs()
        return chunk

    def final(self) -> dict:
        echo = self.prompts[0].echo_text
        choices = []
        for i, c in sorted(self.finals.items()):
            message, finish_reason = whole_message(self.reading, echo + c.text, c.finish_reason)
            choices.append({"index": i, "message": {"role": "assistant", **message},
                            "logprobs": self.logprobs(c.logprobs or []), "finish_reason": finish_reason,
                            "stop_reason": c.stop_reason, **self.routing(c)})
        body = {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
        if self.body.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs()
        return body
