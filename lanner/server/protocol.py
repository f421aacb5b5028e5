"""The OpenAI request schema that lanner serves (pydantic), and its translation to
SamplingParams. Every field is applied or refused: an unknown field is a 400 that names
it, and fields lanner knows but does not implement (the legacy `functions`) are refused by
name. Structured outputs come as OpenAI's `response_format`, vLLM's `structured_outputs`
or its older `guided_*` fields (one of them per request); tools as OpenAI's `tools` and
`tool_choice` (chat). Extensions follow vLLM's names: `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `allowed_token_ids`, `bad_words`,
`prompt_logprobs`, `truncate_prompt_tokens`, `return_tokens_as_token_ids`, ..."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from lanner.core.request import RequestOutputKind, SamplingParams
from lanner.errors import InvalidRequest

NOT_SUPPORTED = {  # field -> what to use instead
    "functions": "the legacy functions API is not supported: use tools",
    "function_call": "the legacy functions API is not supported: use tool_choice",
    "guided_whitespace_pattern": "not supported (xgrammar): use structured_outputs with disable_any_whitespace",
}
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def refuse(field: str, why: str) -> InvalidRequest:
    error = InvalidRequest(f"{field}: {why}")
    error.param = field
    return error


MAX_NESTING = 16  # of free-form fields (chat_template_kwargs, message extras): deeper is a 400, not a crash


def check_nesting(field: str, value: Any, depth: int = 0) -> None:
    if depth > MAX_NESTING:
        raise refuse(field, f"nested more than {MAX_NESTING} levels deep")
    if isinstance(value, dict):
        for item in value.values():
            check_nesting(field, item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_nesting(field, item, depth + 1)


# strict: JSON true is not the number 1, "0.5" is not a float, [true] is not a list of token ids
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage (so far) in every chunk


# declared, so that check() can refuse them by name rather than as unknown fields
UnsupportedFields = create_model("UnsupportedFields", **{name: (Any, None) for name in NOT_SUPPORTED})


class SamplingFields(UnsupportedFields):
    model_config = STRICT

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    best_of: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    return_tokens_as_token_ids: bool = False
    # lanner's extension (SGLang's name): per output token, the experts every MoE layer chose
    return_routed_experts: bool = False
    use_beam_search: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id, for the caller's own tracking: nothing to apply

    # structured outputs, one way or another (`structured_spec`)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def check(self) -> None:
        for name, why in NOT_SUPPORTED.items():
            if getattr(self, name) is not None:
                raise refuse(name, why)
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise refuse("guided_decoding_backend", "lanner's backend is xgrammar ('auto' or 'xgrammar')")
        for name in ("response_format", "structured_outputs", "guided_json"):
            check_nesting(name, getattr(self, name))
        if self.best_of is not None and self.best_of != self.n:
            raise refuse("best_of", "only best_of == n is supported (lanner returns every sample)")
        if self.use_beam_search:
            raise refuse("use_beam_search", "beam search is not supported")
        if self.stream_options is not None and not self.stream:
            raise refuse("stream_options", "only allowed with stream: true")

    def structured_spec(self) -> dict | None:
        """What the output must match, from whichever field gave it (at most one), as the fields of
        StructuredOutputsParams."""
        given = {name: getattr(self, name) for name in ("response_format", "structured_outputs", *GUIDED)
                 if getattr(self, name) is not None}
        if given.get("response_format", {}).get("type") == "text":
            del given["response_format"]
        if len(given) > 1:
            raise refuse(sorted(given)[1], f"give one of {', '.join(sorted(given))}, not several")
        if not given:
            return None
        name, value = next(iter(given.items()))
        if name == "structured_outputs":
            return value
        if name in GUIDED:
            return {GUIDED[name]: value}
        kind = value.get("type")
        if kind == "json_object":
            return {"json_object": True}
        if kind == "json_schema":
            schema = (value.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise refuse("response_format", "json_schema needs json_schema.schema, a JSON schema object")
            return {"json": schema}
        raise refuse("response_format", f"type must be text, json_object or json_schema, got {kind!r}")

    def sampling_params(self, defaults: dict[str, Any], max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None, structured: dict | None = None) -> SamplingParams:
        """The request's options over the model's generation_config defaults."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_tokens", "seed", "stop_token_ids", "allowed_token_ids",
            "bad_words") if getattr(self, name) is not None}
        if given.get("top_k") == -1:
            given["top_k"] = 0
        if self.logit_bias:
            given["logit_bias"] = logit_bias(self.logit_bias)
        return SamplingParams(**{**defaults, **given, "n": self.n, "stop": self.stop, "max_tokens": max_tokens,
                                 "ignore_eos": self.ignore_eos, "logprobs": logprobs,
                                 "prompt_logprobs": prompt_logprobs,
                                 "include_stop_str_in_output": self.include_stop_str_in_output,
                                 "skip_special_tokens": self.skip_special_tokens,
                                 "return_routed_experts": self.return_routed_experts,
                                 "structured_outputs": structured,
                                 # a stream takes what is new each step; a body is built once, at the end
                                 "output_kind": RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's {"token id": bias} with biases in [-100, 100]."""
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit():
            raise refuse("logit_bias", f"keys must be token ids, got {key!r}")
        if not -100 <= value <= 100:
            raise refuse("logit_bias", f"biases must be in [-100, 100], got {value}")
        out[int(key)] = float(value)
    return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 only with echo (scoring a prompt)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise refuse("suffix", "insertion (suffix) is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise refuse("max_tokens", "must be >= 1 (0 is allowed only with echo, to score the prompt)")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            raise refuse("prompt", "the prompt is empty")
        return list(p)

    def params(self, defaults: dict[str, Any]) -> SamplingParams:
        # echo + logprobs also scores the prompt; max_tokens 0 generates one token that is not shown
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self.sampling_params(defaults, max(self.max_tokens, 1) if self.max_tokens is not None else None,
                                    self.logprobs, prompt_logprobs, self.structured_spec())


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extra fields reach the chat template as they are

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


def conversation_of(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        message = m.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        for call in message.get("tool_calls") or ():  # templates take the arguments as an object, as vLLM gives them
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except (ValueError, RecursionError):
                    pass  # not JSON: the template gets the text
        out.append(message)
    return out


def client_template(body: Any) -> str | None:
    """The chat template a chat or tokenize request sent, if any: code the server would run."""
    return body.chat_template or (body.chat_template_kwargs or {}).get("chat_template")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    echo: bool = False  # start the reply with the last message's content when it is the assistant's
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        for tool in self.tools or ():
            check_nesting("tools", tool.function.parameters)
        if self.top_logprobs is not None and not self.logprobs:
            raise refuse("top_logprobs", "needs logprobs: true")
        check_nesting("chat_template_kwargs", self.chat_template_kwargs)
        check_nesting("messages", self.conversation())

    def conversation(self) -> list[dict]:
        return conversation_of(self.messages)

    def params(self, defaults: dict[str, Any], forced: dict | None = None) -> SamplingParams:
        """`forced`: the grammar of a forced tool call, which excludes any other structured output."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        structured = self.structured_spec()
        if forced is not None and structured is not None:
            raise refuse("tool_choice", "a forced tool call is itself a structured output; drop response_format "
                                        "or the guided fields")
        return self.sampling_params(defaults, self.max_completion_tokens or self.max_tokens, logprobs,
                                    self.prompt_logprobs, forced or structured)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""
    model_config = STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise refuse("prompt", "give either prompt or messages")
        check_nesting("chat_template_kwargs", self.chat_template_kwargs)
        check_nesting("messages", conversation_of(self.messages or []))


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[int]
