"""What a vLLM user passes to LLM(...) and `lanner serve`: model names (Hub repo ids
resolved from a cache this test builds, offline), engine options applied or refused by
name, and the server's flags."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import httpx
import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.cli import build_parser, serve_configs, uvicorn_options
from lanner.config import EngineConfig
from lanner.default_model import DEFAULT_MODEL
from lanner.errors import ConfigError, InvalidRequest, UnsupportedModel

MAIN, V2 = "a" * 40, "b" * 40
ONE_LAYER = {"num_hidden_layers": 1, "layer_types": ["full_attention"]}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding org/tiny (the embedded model) at two revisions; offline."""
    repo = tmp_path / "models--org--tiny"
    for commit in (MAIN, V2):
        shutil.copytree(DEFAULT_MODEL, repo / "snapshots" / commit)
    # revision v2 is a one-layer variant, so picking the wrong snapshot shows
    config = json.loads((repo / "snapshots" / V2 / "config.json").read_text())
    config.update(ONE_LAYER)
    (repo / "snapshots" / V2 / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_a_hub_repo_id_resolves_from_the_cache_offline(hub_cache, monkeypatch):
    local = LLM(num_kv_blocks=64).generate("def f(x):", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    by_id = LLM("org/tiny", download_dir=str(hub_cache), num_kv_blocks=64)
    assert by_id.engine.tokenizer_path.endswith(MAIN)
    assert by_id.generate("def f(x):", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == local
    v2 = LLM("org/tiny", revision="v2", download_dir=str(hub_cache), num_kv_blocks=64, load_format="dummy")
    assert v2.engine.hf_config.num_hidden_layers == 1
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))  # the default cache
    assert LLM(model="org/tiny", num_kv_blocks=64, load_format="dummy").engine.hf_config.num_hidden_layers > 1


def test_a_repo_id_missing_from_the_cache_is_a_clear_error_offline(hub_cache):
    with pytest.raises(ConfigError, match="org/absent.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        LLM("org/absent", download_dir=str(hub_cache))
    with pytest.raises(ConfigError, match="revision 'v9'"):
        LLM("org/tiny", revision="v9", download_dir=str(hub_cache))
    with pytest.raises(ConfigError, match="neither a local folder"):
        LLM("not a model")


@pytest.mark.parametrize("alias,dtype", [("half", torch.float16), ("float16", torch.float16),
                                         ("bfloat16", torch.bfloat16), ("float", torch.float32),
                                         ("float32", torch.float32)])
def test_dtype_aliases(alias, dtype):
    llm = LLM(dtype=alias, num_kv_blocks=16, device="cpu")
    assert llm.engine.dtype == dtype and next(llm.engine.runner.model.parameters()).dtype == dtype


def test_generation_config_sources(tmp_path):
    assert LLM(num_kv_blocks=16).engine.sampling_defaults["temperature"] == 0.5  # the model's own
    bare = LLM(num_kv_blocks=16, generation_config="vllm")
    assert bare.engine.sampling_defaults == {} and bare.get_default_sampling_params() == SamplingParams()
    assert bare.engine.eos_token_ids == LLM(num_kv_blocks=16).engine.eos_token_ids  # stopping stays
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.25, "top_k": 7}')
    other = LLM(num_kv_blocks=16, generation_config=str(tmp_path))
    assert other.engine.sampling_defaults == {"temperature": 0.25, "top_k": 7}
    with pytest.raises(ConfigError, match="generation_config"):
        LLM(num_kv_blocks=16, generation_config=str(tmp_path / "nowhere"))


def test_hf_overrides_change_the_built_model():
    llm = LLM(num_kv_blocks=16, hf_overrides=ONE_LAYER, load_format="dummy")  # the checkpoint has more layers
    assert llm.engine.hf_config.num_hidden_layers == 1 and len(llm.engine.runner.model.model.layers) == 1
    with pytest.raises(UnsupportedModel, match="hf_overrides"):
        LLM(num_kv_blocks=16, hf_overrides={"num_hidden_layers": 1})  # transformers checks layer_types


def test_max_logprobs_bounds_requests():
    llm = LLM(num_kv_blocks=16, max_logprobs=2)
    with pytest.raises(InvalidRequest, match="max_logprobs"):
        llm.generate("x", SamplingParams(logprobs=3), use_tqdm=False)
    with pytest.raises(InvalidRequest, match="max_logprobs"):
        llm.generate("x", SamplingParams(prompt_logprobs=5), use_tqdm=False)
    assert llm.generate("x", SamplingParams(logprobs=2, max_tokens=2), use_tqdm=False)[0].outputs[0].logprobs
    wide = LLM(num_kv_blocks=16, max_logprobs=-1)
    out = wide.generate("x", SamplingParams(logprobs=50, max_tokens=1), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs[0]) >= 50


def test_chunked_prefill_off_prefills_each_prompt_in_one_step():
    prompt = list(range(10, 110))
    on = LLM(num_kv_blocks=64, max_num_batched_tokens=32, max_model_len=32 * 4)
    off = LLM(num_kv_blocks=64, max_num_batched_tokens=256, max_model_len=256, enable_chunked_prefill=False)
    for llm in (on, off):
        llm.engine.add_request("a", prompt, SamplingParams(max_tokens=1))
        llm.engine.add_request("b", list(range(200, 260)), SamplingParams(max_tokens=1))
    first_on, first_off = on.engine.scheduler.schedule(), off.engine.scheduler.schedule()
    assert [n for _, n in first_on.scheduled] == [32]  # chunked
    assert [n for _, n in first_off.scheduled] == [100, 60]  # whole prompts
    small = LLM(num_kv_blocks=64, max_num_batched_tokens=256, max_model_len=256, enable_chunked_prefill=False)
    small.engine.add_request("a", prompt, SamplingParams(max_tokens=1))
    small.engine.add_request("b", list(range(300, 501)), SamplingParams(max_tokens=1))
    assert [n for _, n in small.engine.scheduler.schedule().scheduled] == [100]  # b waits for a whole step
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        LLM(num_kv_blocks=64, max_num_batched_tokens=64, max_model_len=256, enable_chunked_prefill=False)


@pytest.mark.parametrize("option,value,fragment", [
    ("quantization", "fp8", "quantization 'fp8' is not supported yet"),
    ("quantization", "awq", "not supported yet"),
    ("kv_cache_dtype", "fp8_e5m2", "kv_cache_dtype 'fp8_e5m2' is not supported"),
    ("kv_cache_dtype", "int8", "kv_cache_dtype 'int8': one of auto, fp8, fp8_e4m3"),
    ("attention_backend", "flash", "attention_backend 'flash': one of auto, torch, triton"),  # the CLI's choices
    ("load_format", "pt", "load_format 'pt': one of"),
    ("tokenizer_mode", "mistral", "tokenizer_mode 'mistral' is not supported"),
    ("tokenizer_mode", "slow", "no slow tokenizers"),
    ("tensor_parallel_size", 0, "tensor_parallel_size must be >= 1"),
    ("nnodes", 2, "must be a multiple of nnodes"),
    ("cuda_graph_sizes", [512, 1024], r"at least one must be at most max_num_seqs \(256\)"),  # crashed at start
])
def test_options_lanner_cannot_honour_are_refused_by_name(option, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        EngineConfig.from_kwargs(**{option: value})


def test_whole_forward_graphs_are_refused_where_attention_cannot_be_captured():
    """The torch attention backend (the CPU path) cannot sit inside a CUDA graph: an explicit
    prefill_graph_max_tokens is refused, 0 and the default are not."""
    for piecewise in (True, None):
        with pytest.raises(ConfigError, match="prefill_graph_max_tokens=512 needs the Triton attention backend"):
            LLM(prefill_graph_max_tokens=512, piecewise_graphs=piecewise)
    assert LLM(prefill_graph_max_tokens=0, piecewise_graphs=True).engine.runner.piecewise.full_sizes == []
    assert LLM(piecewise_graphs=True).engine.runner.piecewise.full_sizes == []


@pytest.mark.parametrize("kwargs", [
    {"trust_remote_code": True}, {"tokenizer_mode": "auto"}, {"enable_chunked_prefill": True},
    {"disable_log_stats": True}, {"quantization": None}, {"kv_cache_dtype": "auto"}, {"kv_cache_dtype": "fp8"},
    {"seed": 3},
    {"revision": "main"}, {"load_format": "safetensors"}])
def test_everyday_vllm_options_are_accepted(kwargs):
    EngineConfig.from_kwargs(**kwargs)
    assert LLM(num_kv_blocks=16, **kwargs).generate("x", SamplingParams(max_tokens=2), use_tqdm=False)


def test_an_fp8_kv_cache_holds_more_tokens_in_the_same_memory_and_keeps_greedy_outputs():
    """kv_cache_dtype=fp8 (issue [12]): the cache's elements are e4m3, so the same kv_cache_memory_gib
    holds 4x the blocks of the CPU path's float32 cache; greedy outputs of the embedded model stay
    those of the full-precision cache while the logprobs move a little (the cache really is fp8), and
    a prefix-cache hit over fp8 blocks gives the same tokens again."""
    prompts = ["The capital of France is", "1 2 3 4 5", "Once upon a time there was a fox. " * 6]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=0)
    full, fp8 = LLM(kv_cache_memory_gib=0.01), LLM(kv_cache_memory_gib=0.01, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.num_blocks >= 4 * full.engine.runner.num_blocks
    want, got = (llm.generate(prompts, params, use_tqdm=False) for llm in (full, fp8))
    moved = 0.0
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            moved = max(moved, abs(next(iter(x.values())).logprob - next(iter(y.values())).logprob))
    assert 1e-3 < moved < 0.5
    again = fp8.generate(prompts, params, use_tqdm=False)
    assert again[2].num_cached_tokens >= 32
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in got]


def test_a_checkpoints_kv_cache_scales_are_applied_to_an_fp8_cache(kv_scaled_model, caplog):
    """A checkpoint's per-layer `self_attn.k_scale` / `v_scale` (as calibrated fp8-KV checkpoints
    carry): an fp8 cache holds K / k_scale and V / v_scale, and attention multiplies them back, so
    greedy outputs stay those of the unscaled fp8 cache, and the first layer's cached values (the
    later layers' inputs differ by the rounding of subnormal e4m3 numbers) are exactly 2x and 1/4 of
    it wherever both are normal e4m3 numbers. A cache of the model's dtype leaves the scales unused,
    and says so."""
    path, layers = kv_scaled_model
    prompts = ["The capital of France is", "Once upon a time there was a fox. " * 6]
    params = SamplingParams(max_tokens=16, temperature=0)
    plain, scaled = LLM(kv_cache_dtype="fp8", num_kv_blocks=64), LLM(model=path, kv_cache_dtype="fp8", num_kv_blocks=64)
    assert scaled.engine.runner.backend.kv_scales == [(0.5, 4.0)] * layers
    want, got = (llm.generate(prompts, params, use_tqdm=False) for llm in (plain, scaled))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    (k, v), (k2, v2) = (t.float() for t in plain.engine.runner.kv_caches[0]), \
        (t.float() for t in scaled.engine.runner.kv_caches[0])
    normal = (k.abs() >= 2 ** -5) & (v.abs() >= 2 ** -4)  # both sides normal: scaling by 2^n is exact
    assert normal.sum() > 1000 and torch.equal(k2[normal], 2 * k[normal]) and torch.equal(v2[normal], v[normal] / 4)
    with caplog.at_level(logging.WARNING):
        full = LLM(model=path, num_kv_blocks=64)
    assert full.engine.runner.kv_scales is None and "used only with kv_cache_dtype fp8" in caplog.text


@pytest.mark.parametrize("k_name,v_name", [("k_proj.k_scale", "v_proj.v_scale"),
                                           ("k_proj.output_scale", "v_proj.output_scale"), ("kv_scale", None)])
def test_kv_cache_scales_under_the_other_names_checkpoints_use(kv_scaled_model, k_name, v_name):
    """ModelOpt's `self_attn.k_proj.k_scale`, compressed-tensors' `k_proj.output_scale` and the older
    single `kv_scale` (for K and V both) reach the same scales as `self_attn.k_scale` / `v_scale`."""
    from safetensors.torch import load_file, save_file

    path, layers = kv_scaled_model
    weights = load_file(f"{path}/model.safetensors")
    for i in range(layers):
        k, v = weights.pop(f"model.layers.{i}.self_attn.k_scale"), weights.pop(f"model.layers.{i}.self_attn.v_scale")
        weights[f"model.layers.{i}.self_attn.{k_name}"] = k
        if v_name:
            weights[f"model.layers.{i}.self_attn.{v_name}"] = v
    save_file(weights, f"{path}/model.safetensors")
    llm = LLM(model=path, kv_cache_dtype="fp8", num_kv_blocks=16)
    assert llm.engine.runner.backend.kv_scales == [(0.5, 4.0 if v_name else 0.5)] * layers


def test_a_query_scale_is_refused_not_ignored(kv_scaled_model):
    """fp8 attention's query scale has no use here: refused by name, as any tensor of no parameter."""
    from safetensors.torch import load_file, save_file

    path, _ = kv_scaled_model
    weights = load_file(f"{path}/model.safetensors")
    weights["model.layers.0.self_attn.q_proj.output_scale"] = torch.tensor(1.0)
    save_file(weights, f"{path}/model.safetensors")
    with pytest.raises(ConfigError, match="q_proj.output_scale"):
        LLM(model=path, kv_cache_dtype="fp8", num_kv_blocks=16)


def test_kv_cache_scales_that_are_not_finite_and_positive_are_refused(kv_scaled_model):
    from safetensors.torch import load_file, save_file

    path, _ = kv_scaled_model
    weights = load_file(f"{path}/model.safetensors")
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.0)  # would divide by zero in the first store
    save_file(weights, f"{path}/model.safetensors")
    with pytest.raises(ConfigError, match=r"layer 0's KV-cache scales \(k_scale, v_scale\) = \(0.5, 0.0\)"):
        LLM(model=path, kv_cache_dtype="fp8", num_kv_blocks=16)


def test_an_fp8_kv_cache_is_refused_where_its_kernels_cannot_run_right():
    """Triton's CPU interpreter rounds some values into e4m3 wrongly: the Triton backend on the CPU
    with an fp8 cache is refused (the torch backend runs it); so are GPUs under compute capability
    8.9, which have no e4m3 (not testable here: ModelRunner._check_fp8_kv_runs_here)."""
    with pytest.raises(ConfigError, match="on the CPU use attention_backend torch"):
        LLM(kv_cache_dtype="fp8", attention_backend="triton", num_kv_blocks=16)
    assert LLM(kv_cache_dtype="fp8", attention_backend="torch", num_kv_blocks=16).generate(
        "x", SamplingParams(max_tokens=2), use_tqdm=False)


def test_engine_stats_are_logged_unless_disabled(caplog):
    from lanner.serving.async_engine import EngineLoop

    class NullSink:
        def outputs(self, items, stats): ...

    for disabled, expect in ((False, True), (True, False)):
        llm = LLM(num_kv_blocks=16, disable_log_stats=disabled)
        loop = EngineLoop(llm.engine, NullSink())
        loop._last_log = (0.0, 0, 0)  # as if the last log was long ago
        with caplog.at_level(logging.INFO, logger="lanner.serving.async_engine"):
            caplog.clear()
            loop._log_stats()
        assert ("generated tokens/s" in caplog.text) is expect




def test_a_steps_named_ranges_reach_a_profiler_and_cost_nothing_without_one(monkeypatch):
    import lanner.core.profiling as profiling

    llm = LLM(num_kv_blocks=16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    names = {event.name for event in prof.events()}
    assert {"schedule", "prepare", "model", "sample", "read back", "postprocess"} <= names

    def no_record_function(name):
        raise AssertionError(f"record_function({name!r}) with no profiler running")

    monkeypatch.setattr(profiling, "record_function", no_record_function)
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
# ---- lanner serve's flags -----------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_takes_the_model_positionally_and_names_it_as_vllm_does(tmp_path, monkeypatch):
    config, engine = serve_configs(serve_args("org/tiny", "-tp", "1"))
    assert engine.model.model == "org/tiny" and config.served_model_name == ["org/tiny"]
    assert engine.parallel.tensor_parallel_size == 1
    config, engine = serve_configs(serve_args("--model", DEFAULT_MODEL))
    assert config.served_model_name == ["lanner-tiny"]
    config, _ = serve_configs(serve_args(DEFAULT_MODEL, "--served-model-name", "a", "b"))
    assert config.served_model_name == ["a", "b"]
    with pytest.raises(ConfigError, match="two models"):
        serve_configs(serve_args("org/one", "--model", "org/two"))
    _, engine = serve_configs(serve_args("-tp", "2", "--nnodes", "2", "--node-rank", "1", "--master-port", "9"))
    assert (engine.parallel.tensor_parallel_size, engine.parallel.nnodes, engine.parallel.node_rank) == (2, 2, 1)
    with pytest.raises(ConfigError, match="node_rank"):
        serve_configs(serve_args("-tp", "2", "--nnodes", "2", "--node-rank", "2", "--master-port", "9"))


def test_serve_flags_reach_the_server(tmp_path, monkeypatch):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0].content }}")
    monkeypatch.delenv("LANNER_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    config, engine = serve_configs(serve_args(
        "--chat-template", str(template), "--generation-config", "vllm", "--disable-log-requests",
        "--root-path", "/proxy", "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem",
        "--trust-request-chat-template", "--hf-overrides", '{"num_hidden_layers": 1}', "--dtype", "half",
        "--max-logprobs", "5", "--no-enable-chunked-prefill", "--disable-log-stats", "--trust-remote-code",
        "--disable-uvicorn-access-log"))
    assert config.chat_template == "{{ messages[0].content }}" and config.api_key == "from-vllm"
    assert config.root_path == "/proxy" and config.trust_request_chat_template and config.disable_log_requests
    assert engine.model.generation_config == "vllm" and engine.model.hf_overrides == {"num_hidden_layers": 1}
    assert engine.dtype == "half" and engine.model.max_logprobs == 5 and engine.disable_log_stats
    assert engine.scheduler.enable_chunked_prefill is False and engine.model.trust_remote_code
    opts = uvicorn_options(config)
    assert opts["ssl_keyfile"] == "k.pem" and opts["ssl_certfile"] == "c.pem" and opts["access_log"] is False
    assert uvicorn_options(serve_configs(serve_args())[0])["access_log"] is True
    monkeypatch.setenv("LANNER_API_KEY", "mine")
    assert serve_configs(serve_args())[0].api_key == "mine"  # lanner's name first
    assert serve_configs(serve_args("--api-key", "flag"))[0].api_key == "flag"
    config, _ = serve_configs(serve_args("--chat-template", "{{ 'inline' }}"))
    assert config.chat_template == "{{ 'inline' }}"


@pytest.mark.parametrize("argv,env,fragment", [
    (["--api-key", ""], {}, "API key is empty"), ([], {"VLLM_API_KEY": " "}, "API key is empty"),
    (["--ssl-keyfile", "k.pem"], {}, "both"),
    (["--enable-log-requests", "--disable-log-requests"], {}, "contradict")])
def test_serve_refuses_unsafe_or_contradictory_flags(argv, env, fragment, monkeypatch):
    monkeypatch.delenv("LANNER_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=fragment):
        serve_configs(serve_args(*argv))


def test_root_path_and_request_logs(caplog):
    from test_server import make_app, serve_in_thread

    app, _ = make_app(root_path="/proxy", enable_log_requests=True, api_key="k")
    key = {"Authorization": "Bearer k"}
    for base in serve_in_thread(app, **uvicorn_options(app.state.config)):
        # the proxy strips /proxy; the app knows it is mounted there, and the API key still applies
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers=key).status_code == 200
        assert httpx.get(base + "/openapi.json", headers=key).json()["servers"] == [{"url": "/proxy"}]
        assert httpx.get(base + "/docs").status_code == 401  # the API description follows the key
        with caplog.at_level(logging.INFO, logger="lanner.server.app"):
            r = httpx.post(base + "/v1/completions", json={"prompt": "secret words", "max_tokens": 2}, headers=key)
        assert r.status_code == 200
        assert "prompt tokens [" in caplog.text and "secret" not in caplog.text


def test_bench_throughput_runs_a_sampled_workload(tmp_path):
    """`lanner bench throughput` with sampling flags: the workload a served model's
    generation_config asks for (greedy otherwise), recorded in the JSON."""
    from lanner.cli import main

    out = tmp_path / "run.json"
    main(["bench", "throughput", "--num-prompts", "4", "--input-range", "8", "16", "--output-range", "4", "8",
          "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1",
          "--output-json", str(out)])
    run = json.loads(out.read_text())
    assert run["workload"]["sampling"] == {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.1}
    assert "greedy" not in run["workload"] and 16 <= run["results"]["output_tokens"] <= 32
    from lanner.bench.runs import _sampling, add_parser

    sub = argparse.ArgumentParser().add_subparsers(dest="cmd")
    add_parser(sub)

    def recorded(*flags: str) -> dict:
        return _sampling(sub.choices["bench"].parse_args(["throughput", *flags]))[1]

    assert recorded() == {"greedy": True}  # the effective parameters, defaults included
    assert recorded("--logprobs", "5") == {"sampling": {"logprobs": 5, "temperature": 0.0}}
    assert recorded("--top-p", "0.9") == {"sampling": {"top_p": 0.9, "temperature": 1.0}}
