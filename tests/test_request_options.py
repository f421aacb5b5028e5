"""Every request option the server accepts is applied or refused with a 400 that names it
(as a vLLM user would send them, through the real `openai` client where it can send them)."""
# ruff: noqa: F811 (pytest fixtures imported from test_server are parameters here)
from __future__ import annotations

import json

import httpx
import openai
import pytest

from lanner import SamplingParams
from test_server import ENGINE_ARGS, MODEL, client, make_app, offline, serve_in_thread, server, wait_idle  # noqa: F401 (fixtures)

TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}\n"
    "{{ m['content'] or '' }}{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}"
    "({{ c.function.arguments.city }}){% endfor %}<|im_end|>\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GREEDY = {"temperature": 0, "max_tokens": 10}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server[0] + path, json={"model": MODEL, **body}, timeout=60)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "x", "no_such_option": 1}, "no_such_option"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "frobnicate": True}, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "guided_whitespace_pattern": " "},
     "guided_whitespace_pattern"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],  # "auto" needs the server's flags
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f", "colour": 1}}]}, "colour"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 7 * 7 }}"},
     "chat_template"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}]}, "image_url"),
])
def test_unknown_and_unsupported_fields_get_a_400_naming_them(server, path, body, field):
    error = error_of(post(server, path, body))
    assert field in error["message"] and error["type"] == "invalid_request_error"


def test_response_format_text_is_openais_default_and_accepted(server):
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2,
                                            "response_format": {"type": "text"}}).status_code == 200


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert error_of(post(server, "/v1/chat/completions", {"model": "nope", "messages": [
        {"role": "user", "content": "x"}]}), 404)["param"] == "model"


def test_prompt_plus_max_tokens_over_the_context_is_a_400_with_the_numbers(server):
    limit = ENGINE_ARGS["max_model_len"]
    prompt = [5] * 100
    error = error_of(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": limit - 99}))
    assert error["param"] == "max_tokens"
    for number in (100, limit - 99, limit + 1, limit):
        assert str(number) in error["message"]
    assert post(server, "/v1/completions", {"prompt": prompt, "max_tokens": limit - 100}).status_code == 200
    error = error_of(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_completion_tokens": limit}))
    assert error["param"] == "max_tokens" and str(limit) in error["message"]


def test_completions_default_to_16_tokens(client):
    out = client.completions.create(model=MODEL, prompt="def f(x):", temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


# ---- echo and prompt logprobs ----------------------------------------------------------------


def test_lm_eval_loglikelihood_request_returns_the_prompts_logprobs(client, offline):
    """lm-evaluation-harness scores a continuation with echo + logprobs + max_tokens 0."""
    prompt = "def add(a, b):\n    return a + b"
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = out.choices[0]
    want = offline.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert choice.text == prompt and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(want.prompt_token_ids) == out.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [entry[tid].logprob for tid, entry in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])


def test_echo_prepends_the_prompt_streaming_or_not(client):
    plain = client.completions.create(model=MODEL, prompt="import os", **GREEDY).choices[0]
    echoed = client.completions.create(model=MODEL, prompt="import os", echo=True, logprobs=0, **GREEDY).choices[0]
    assert echoed.text == "import os" + plain.text
    assert len(echoed.logprobs.tokens) == len(echoed.logprobs.text_offset)
    streamed = client.completions.create(model=MODEL, prompt="import os", echo=True, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == echoed.text
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], echo=True, **GREEDY).choices[0]
    assert ids.text.endswith(client.completions.create(model=MODEL, prompt=[5, 6, 7], **GREEDY).choices[0].text)


def test_prompt_logprobs_and_tokens_as_ids(server, offline):
    r = post(server, "/v1/completions", {"prompt": "x = 1", "prompt_logprobs": 2, "logprobs": 1,
                                         "return_tokens_as_token_ids": True, **GREEDY}).json()
    choice = r["choices"][0]
    want = offline.generate("x = 1", SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(want.prompt_token_ids)
    for tid, entry, mine in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:], entries[1:]):
        assert mine[str(tid)]["logprob"] == pytest.approx(entry[tid].logprob, abs=1e-5)
        assert 2 <= len(mine) <= 3 and all({"logprob", "rank", "decoded_token"} <= set(v) for v in mine.values())
    assert all(t.startswith("token_id:") for t in choice["logprobs"]["tokens"])
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                                 "prompt_logprobs": 0, "return_tokens_as_token_ids": True,
                                                 **GREEDY}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(t["token"].startswith("token_id:") for t in chat["choices"][0]["logprobs"]["content"])


def test_truncate_prompt_tokens_keeps_the_last_tokens(client):
    prompt = list(range(40, 80))
    cut = client.completions.create(model=MODEL, prompt=prompt, extra_body={"truncate_prompt_tokens": 8}, **GREEDY)
    same = client.completions.create(model=MODEL, prompt=prompt[-8:], **GREEDY)
    assert cut.usage.prompt_tokens == 8 and cut.choices[0].text == same.choices[0].text


def test_continuous_usage_stats_count_tokens_so_far(client):
    chunks = list(client.completions.create(
        model=MODEL, prompt="for i in", stream=True, stream_options={"include_usage": True,
                                                                     "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}, **GREEDY))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == GREEDY["max_tokens"] and len(set(counts)) > 1
    assert chunks[-1].usage.completion_tokens == GREEDY["max_tokens"] and not chunks[-1].choices


def test_include_stop_str_in_output_on_the_server(client):
    base = client.completions.create(model=MODEL, prompt="def main():", **GREEDY).choices[0].text
    stop = base[4:6]
    assert stop.strip(), base
    cut = client.completions.create(model=MODEL, prompt="def main():", stop=[stop], **GREEDY).choices[0].text
    kept = client.completions.create(model=MODEL, prompt="def main():", stop=[stop],
                                     extra_body={"include_stop_str_in_output": True}, **GREEDY).choices[0].text
    assert kept == cut + stop


def test_skip_special_tokens_false_shows_them(client, offline):
    eos = offline.get_tokenizer().eos_token
    ids = offline.get_tokenizer()(f"a{eos}b")["input_ids"]
    shown = client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=1, temperature=0,
                                      extra_body={"skip_special_tokens": False}).choices[0].text
    assert eos in shown


# ---- chat -------------------------------------------------------------------------------


def test_chat_content_parts_are_joined_as_text(client):
    parts = [{"type": "text", "text": "Write"}, {"type": "text", "text": "a loop."}]
    joined = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], **GREEDY)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write\na loop."}],
                                           **GREEDY)
    assert joined.choices[0].message.content == plain.choices[0].message.content
    assert joined.usage.prompt_tokens == plain.usage.prompt_tokens


def test_continue_final_message_and_chat_echo(server, client):
    messages = [{"role": "user", "content": "Write a loop."}, {"role": "assistant", "content": "for i in"}]
    cont = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, extra_body={
        "continue_final_message": True, "add_generation_prompt": False})
    tokens = post(server, "/tokenize", {"messages": messages, "continue_final_message": True,
                                        "add_generation_prompt": False}).json()
    text = post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("for i in") and cont.usage.prompt_tokens == tokens["count"]
    echoed = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "echo": True})
    assert echoed.choices[0].message.content == "for i in" + cont.choices[0].message.content
    streamed = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "echo": True})
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == echoed.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.choices[0].delta.role is None for c in chunks[1:])
    error = error_of(post(server, "/v1/chat/completions", {"messages": messages, "continue_final_message": True}))
    assert "continue_final_message" in error["message"]


# ---- tokenize, detokenize, ping ------------------------------------------------------------


def test_tokenize_detokenize_ping(server, offline):
    tok = offline.get_tokenizer()
    r = post(server, "/tokenize", {"prompt": "def f(x):", "return_token_strs": True}).json()
    assert r["tokens"] == tok("def f(x):")["input_ids"] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == ENGINE_ARGS["max_model_len"] and r["token_strs"] == tok.convert_ids_to_tokens(
        r["tokens"])
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "def f(x):"}
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == offline.engine.render_chat([{"role": "user", "content": "hi"}])
    assert error_of(post(server, "/detokenize", {"tokens": [10 ** 9]}))["param"] == "tokens"
    assert error_of(post(server, "/tokenize", {"prompt": "a", "messages": []}))["param"] == "prompt"
    for method in (httpx.get, httpx.post):
        assert method(server[0] + "/ping").status_code == 200


# ---- server options: chat template, trusted request templates, several names ---------------------


def test_server_chat_template_and_tool_messages_reach_it():
    app, engine = make_app(chat_template=TOOL_TEMPLATE, served_model_name=["a", "b"])
    for base in serve_in_thread(app):
        messages = [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        r = httpx.post(base + "/tokenize", json={"model": "b", "messages": messages}).json()
        text = httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
        assert "CALL get_weather(Oslo)" in text and "tool [c1]sunny" in text
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        out = c.chat.completions.create(model="b", messages=messages, **GREEDY)
        assert out.model == "a" and out.usage.prompt_tokens == r["count"]
        assert [m.id for m in c.models.list().data] == ["a", "b"]
        # a request's own template is refused here, but applied where the server trusts it
        bad = httpx.post(base + "/v1/chat/completions", json={"model": "a", "messages": messages[:1],
                                                              "chat_template": "{{ 'X' }}"})
        assert bad.status_code == 400 and "--trust-request-chat-template" in bad.json()["error"]["message"]
        wait_idle(engine)
    app, engine = make_app(trust_request_chat_template=True)
    for base in serve_in_thread(app):
        r = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "chat_template": "ZZ{{ messages[0].content }}"}).json()
        assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "ZZhi"


def test_echo_logprobs_of_a_chunked_prompt_arrive_whole_in_the_stream(offline):
    """A prompt longer than the step's token budget is scored over several steps; the stream's
    first chunk must still carry every prompt token's logprob."""
    app, engine = make_app(max_waiting_requests=None)
    engine.transport.engine.scheduler.config.max_num_batched_tokens = 16
    prompt = list(range(20, 70))
    for base in serve_in_thread(app):
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        whole = c.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, **GREEDY).choices[0]
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, stream=True, **GREEDY))
        streamed = [t for ch in chunks for t in ch.choices[0].logprobs.token_logprobs]
        assert streamed == pytest.approx(whole.logprobs.token_logprobs, nan_ok=True)
        assert len(chunks[0].choices[0].logprobs.tokens) >= len(prompt)


def test_logit_bias_allowed_tokens_and_bad_words_through_the_server(client, offline):
    base = client.completions.create(model=MODEL, prompt="def f(x):", **GREEDY, extra_body={"ignore_eos": True})
    biased = client.completions.create(model=MODEL, prompt="def f(x):", logit_bias={"77": 100}, **GREEDY,
                                       extra_body={"ignore_eos": True})
    tok = offline.get_tokenizer()
    assert tok(biased.choices[0].text, add_special_tokens=False)["input_ids"][:3] == [77, 77, 77]
    allowed = [10, 11, 12]
    out = client.completions.create(model=MODEL, prompt="def f(x):", logprobs=0, **GREEDY,
                                    extra_body={"allowed_token_ids": allowed, "ignore_eos": True,
                                                "return_tokens_as_token_ids": True})
    assert {int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens} <= set(allowed)
    word = next(w for w in base.choices[0].text.split() if w.isidentifier() and len(w) > 2)
    banned = client.completions.create(model=MODEL, prompt="def f(x):", **GREEDY,
                                       extra_body={"bad_words": [word], "ignore_eos": True})
    assert word not in banned.choices[0].text.split() and word in base.choices[0].text.split()
    want = offline.generate("def f(x):", SamplingParams(**GREEDY, repetition_penalty=1.1, ignore_eos=True,
                                                        bad_words=[word]), use_tqdm=False)[0]
    assert banned.choices[0].text == want.outputs[0].text
