"""The server's request options on the GPU path (graphs, overlap, Triton sampling): the
lm-eval loglikelihood request matches the offline API's prompt logprobs, constraints apply.
Needs the server extra (on the GPU machine: the wheels of scripts/server_wheels.sh)."""
from __future__ import annotations

import httpx
import pytest

try:
    import fastapi  # noqa: F401
except ImportError as e:  # fail, not skip: the GPU run must install them
    raise ImportError("tests/gpu/test_server_gpu.py needs the server extra: on the GPU machine, install the "
                      "wheels of scripts/server_wheels.sh (carry .wheels)") from e

from lanner import LLM, SamplingParams  # noqa: E402
from lanner.config import EngineConfig, ServerConfig  # noqa: E402
from lanner.engine.engine import LLMEngine  # noqa: E402
from lanner.server.app import build_app  # noqa: E402
from lanner.serving.async_engine import AsyncEngine  # noqa: E402

# a fixed KV cache: two engines live at once here, and each would size its cache to the same budget
ARGS = {"dtype": "float32", "num_kv_blocks": 2048}


def serve_in_thread(app):
    """uvicorn on a free port in a thread (the CPU tests' helper needs packages this machine lacks)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_options_through_the_server_on_the_gpu():
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(**ARGS)))
    offline = LLM(**ARGS)
    prompt = "def add(a, b):\n    return a + b"
    for base in serve_in_thread(build_app(engine, ServerConfig(served_model_name=["m"]))):
        r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1,
                                                       "max_tokens": 0}, timeout=60).json()
        want = offline.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
        got = r["choices"][0]["logprobs"]["token_logprobs"]
        expected = [e[t].logprob for t, e in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:])]
        assert got[0] is None and got[1:] == pytest.approx(expected, abs=1e-4)
        r = httpx.post(base + "/v1/completions", json={
            "prompt": "import os", "max_tokens": 12, "temperature": 0.9, "seed": 1, "ignore_eos": True,
            "allowed_token_ids": [10, 11, 12], "logprobs": 0, "return_tokens_as_token_ids": True}, timeout=60).json()
        assert {int(t.split(":")[1]) for t in r["choices"][0]["logprobs"]["tokens"]} <= {10, 11, 12}
        r = httpx.post(base + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def"}],
            "continue_final_message": True, "add_generation_prompt": False, "echo": True, "max_tokens": 8,
            "temperature": 0, "logit_bias": {"77": 100}}, timeout=60).json()
        assert r["choices"][0]["message"]["content"].startswith("def")
