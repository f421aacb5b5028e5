"""Structured outputs, tool calling and reasoning through `lanner serve`'s app, with the real
`openai` client, on a tiny random Qwen3 whose tokenizer has Qwen3's tool and think tags and whose
chat template renders tools (lanner-tiny's tokenizer plus those tags)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_server import serve_in_thread

from lanner.config import EngineConfig, ServerConfig
from lanner.engine.engine import LLMEngine
from lanner.server.app import build_app
from lanner.serving.async_engine import AsyncEngine

TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these tools:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ._-]{0,12}$"},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ._-]{0,8}$"},
                                           "kids": {"type": "array", "maxItems": 2,
                                                    "items": {"type": "object",
                                                              "properties": {"age": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 17}},
                                                              "required": ["age"]}},
                                           "pet": {"enum": ["cat", "dog", None]}},
          "required": ["name", "kids", "pet"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    from transformers import AddedToken, AutoTokenizer, Qwen3Config

    from lanner.default_model import default_model_path
    from lanner.models.tiny import random_model, save_model_folder

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")])
    tokenizer.chat_template = TEMPLATE
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    config.architectures = ["Qwen3ForCausalLM"]
    folder = str(tmp_path_factory.mktemp("tool-model"))
    save_model_folder(folder, random_model(config), tokenizer)
    return folder


def serve(model: str, reasoning_parser: str | None = None, **server):
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(
        model=model, device="cpu", dtype="float32", num_kv_blocks=512, max_num_seqs=32, max_model_len=1024,
        reasoning_parser=reasoning_parser)))
    return serve_in_thread(build_app(engine, ServerConfig(served_model_name=["m"], **server)))


@pytest.fixture(scope="module")
def client(tool_model):
    for url in serve(tool_model, tool_call_parser="hermes", enable_auto_tool_choice=True):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def thinking_client(tool_model):
    for url in serve(tool_model, reasoning_parser="qwen3"):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_response_format_json_schema_validates_over_many_seeds(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(12):
        reply = client.chat.completions.create(model="m", messages=ASK, response_format=fmt, seed=seed,
                                               temperature=1.0, max_tokens=600)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_vllm_fields_on_completions(client):
    reply = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"}, seed=3,
                                           max_tokens=600, extra_body={"structured_outputs": None})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    for seed in range(4):
        out = client.completions.create(model="m", prompt="x =", seed=seed, max_tokens=200, temperature=1.0,
                                        extra_body={"guided_json": PERSON, "guided_decoding_backend": "xgrammar"})
        jsonschema.validate(json.loads(out.choices[0].text), PERSON)
        out = client.completions.create(model="m", prompt="x =", seed=seed, max_tokens=40,
                                        extra_body={"guided_regex": r"[A-Z][a-z]{2,5} [0-9]{4}"})
        assert __import__("re").fullmatch(r"[A-Z][a-z]{2,5} [0-9]{4}", out.choices[0].text)
        out = client.completions.create(model="m", prompt="x =", seed=seed, max_tokens=40,
                                        extra_body={"guided_choice": ["red", "green", "blue"]})
        assert out.choices[0].text in ("red", "green", "blue")
    out = client.completions.create(model="m", prompt="x =", max_tokens=40, extra_body={
        "structured_outputs": {"grammar": 'root ::= "a" ("b" | "c")+ "."'}})
    assert __import__("re").fullmatch(r"a[bc]+\.", out.choices[0].text)


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "Unsupported type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "parenthesis"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "not several"),
    ({"response_format": {"type": "xml"}}, "json_object or json_schema"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "xgrammar"),
    ({"guided_whitespace_pattern": " *", "guided_json": {}}, "disable_any_whitespace"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "forced tool call"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"functions": [{"name": "f"}]}, "use tools"),
])
def test_bad_constraints_and_tools_are_a_400(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="m", messages=ASK, max_tokens=5, extra_body=extra)


def force(text: str) -> dict:
    """A grammar that makes the random model write `text`, so the parser reads a known call."""
    return {"structured_outputs": {"choice": [text]}}


def test_auto_tool_calls_parse_whole_and_streamed(client):
    reply = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=200,
                                           extra_body=force("Let me look." + CALL_TEXT))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=300, stream=True,
                                                extra_body=force("Let me look." + CALL_TEXT + CALL_TEXT)):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or ():
            entry = calls.setdefault(c.index, {"id": c.id, "name": c.function.name, "arguments": ""})
            entry["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "Let me look." and len(calls) == 2
    assert all(c["name"] == "get_weather" and json.loads(c["arguments"]) == {"city": "Paris", "days": 3}
               and c["id"] for c in calls.values())
    plain = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=200, tool_choice="none",
                                           extra_body=force(CALL_TEXT))
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content == CALL_TEXT


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_always_have_valid_arguments(client, stream):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(6):
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            kwargs = dict(model="m", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed, temperature=1.0,
                          max_tokens=400, extra_body={"parallel_tool_calls": seed % 2 == 0})
            if stream:
                calls, finish = {}, None
                for chunk in client.chat.completions.create(stream=True, **kwargs):
                    for c in chunk.choices[0].delta.tool_calls or ():
                        entry = calls.setdefault(c.index, [c.function.name, ""])
                        entry[1] += c.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                calls = list(calls.values())
            else:
                reply = client.chat.completions.create(**kwargs)
                finish = reply.choices[0].finish_reason
                calls = [[c.function.name, c.function.arguments] for c in reply.choices[0].message.tool_calls]
            assert finish == "tool_calls" and calls
            if isinstance(choice, dict):
                assert [name for name, _ in calls] == ["get_weather"]
            for name, arguments in calls:
                jsonschema.validate(json.loads(arguments), schemas[name])


def test_auto_tool_choice_needs_the_server_options(tool_model):
    for url in serve(tool_model):
        lone = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            lone.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=5)
        forced = lone.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=300)
        assert forced.choices[0].message.tool_calls


def test_tool_history_goes_back_through_the_template(client, tool_model):
    from lanner.engine.prompts import Prompts
    from lanner.models.loader import load_tokenizer
    from lanner.server.protocol import ChatRequest

    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length")
    body = ChatRequest.model_validate({"messages": history}, strict=False)
    text = Prompts(load_tokenizer(tool_model)).render_chat(body.conversation(), tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and '"name": "get_time"' in text


def test_reasoning_is_split_and_the_grammar_applies_after_it(thinking_client, tool_model):
    from transformers import AutoTokenizer

    end = AutoTokenizer.from_pretrained(tool_model).convert_tokens_to_ids("</think>")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    seen_reasoning = False
    for seed in range(6):
        kwargs = dict(model="m", messages=ASK, response_format=fmt, seed=seed, temperature=1.0, max_tokens=600,
                      logit_bias={str(end): 6})  # the random model closes its reasoning after a few tokens
        message = thinking_client.chat.completions.create(**kwargs).choices[0].message
        reasoning = message.model_extra.get("reasoning_content")
        jsonschema.validate(json.loads(message.content), PERSON)
        seen_reasoning |= bool(reasoning)
        streamed = {"reasoning_content": "", "content": ""}
        for chunk in thinking_client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            streamed["content"] += delta.content or ""
            streamed["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
        assert streamed == {"reasoning_content": reasoning or "", "content": message.content}
    assert seen_reasoning
    # thinking off: the template closes the reasoning in the prompt, so the grammar holds from the first token
    reply = thinking_client.chat.completions.create(model="m", messages=ASK, response_format=fmt, max_tokens=600,
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.choices[0].message.model_extra.get("reasoning_content") is None
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_the_option_choices_name_the_parsers_that_exist():
    import typing

    from lanner.config import ServerConfig, StructuredOutputsConfig
    from lanner.engine.grammar import REASONING_TAGS
    from lanner.server.reasoning import REASONING_PARSERS
    from lanner.server.tool_parsers import TOOL_PARSERS

    def choices(cls, name):
        return {a for arg in typing.get_args(typing.get_type_hints(cls)[name]) for a in typing.get_args(arg)}

    assert choices(ServerConfig, "tool_call_parser") == set(TOOL_PARSERS)
    assert choices(StructuredOutputsConfig, "reasoning_parser") == set(REASONING_PARSERS) == set(REASONING_TAGS)
    for name, parser in REASONING_PARSERS.items():
        assert (parser.start_tag, parser.end_tag) == REASONING_TAGS[name]
