"""Prompts to token ids and back with a model's tokenizer: plain text, and chat
conversations through the chat template. The engine uses one for the offline API;
the server keeps its own, so tokenizing and template rendering never run on the
engine loop."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any

from lanner.errors import InvalidRequest

def message_for_template(message: dict) -> dict:
    """One OpenAI-style message as chat templates expect it: content parts joined into one
    string (text parts only, newline-separated, as vLLM does), tool-call arguments given as
    a JSON string parsed into a dict (templates index into them), None fields left out;
    other fields (name, tool_call_id, ...) pass through to the template."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequest("each message must be an object with a string 'role'")
    out = {k: v for k, v in message.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"message content part of type {kind!r} is not supported (text parts only)")
            texts.append(part["text"])
        out["content"] = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise InvalidRequest("message content must be a string or a list of text parts")
    if out.get("tool_calls"):
        out["tool_calls"] = [_parsed_arguments(call) for call in out["tool_calls"]]
    return out


def _parsed_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            return call
        if isinstance(arguments, dict):
            return {**call, "function": {**function, "arguments": arguments}}
    return call


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise InvalidRequest inside the block's Python code (this thread's) once it has run for
    `seconds`. Checked at each call and at each line of Jinja's compiled templates, so a loop
    in a template stops; one long C-level operation is not interrupted."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + seconds

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise InvalidRequest(f"{what} took over {seconds:g} s")
        return check if frame.f_code.co_filename == "<template>" else None  # lines of templates only

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        yield
    finally:
        sys.settrace(previous)


class Prompts:
    def __init__(self, tokenizer: Any, chat_template: str | None = None, render_time_limit_s: float | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # overrides the tokenizer's own (`--chat-template`)
        self.render_time_limit_s = render_time_limit_s

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception as e:  # text the tokenizer cannot take (lone surrogates, ...)
            raise InvalidRequest(f"the text cannot be tokenized: {type(e).__name__}: {e}") from e

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, conversation: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template: str | None = None,
                    tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> str:
        """The conversation's text through the chat template (`chat_template` over the one given
        at construction over the tokenizer's). `continue_final_message` leaves the last
        (assistant) message open so the model continues it, as vLLM does."""
        kwargs = dict(chat_template_kwargs or {})
        for reserved in ("conversation", "tokenize", "add_generation_prompt", "continue_final_message"):
            kwargs.pop(reserved, None)
        template = (chat_template or kwargs.pop("chat_template", None) or self.chat_template
                    or getattr(self.tokenizer, "chat_template", None))
        tools = tools or kwargs.pop("tools", None)
        if not template:
            raise InvalidRequest("this model's tokenizer has no chat template")
        if continue_final_message and add_generation_prompt:
            raise InvalidRequest("continue_final_message and add_generation_prompt cannot both be true")
        messages = [message_for_template(m) for m in conversation]
        if not messages:
            raise InvalidRequest("the conversation has no messages")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequest("continue_final_message needs the last message to be the assistant's")
        try:
            with time_limit(self.render_time_limit_s, "rendering the chat template (--chat-template-timeout-s)"):
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, chat_template=template, tools=tools,
                    add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                    **kwargs)
        except InvalidRequest:
            raise
        except Exception as e:  # a template that rejects the conversation (roles, missing keys)
            raise InvalidRequest(f"the chat template rejected these messages: {type(e).__name__}: {e}") from e

    def chat_token_ids(self, conversation: list[dict], **options: Any) -> list[int]:
        # the template writes the special tokens itself
        return self.encode(self.render_chat(conversation, **options), add_special_tokens=False)
