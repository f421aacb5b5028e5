"""Mixture of experts on the CPU: the router against transformers' (Qwen3-MoE softmax,
DeepSeek-V3 grouped sigmoid with and without the correction bias), the DeepSeek-V3 block with
shared experts, checkpoint loading of per-expert tensors, padding rows, empty steps and the
strategy registry's fallback. Whole-model parity of Qwen3-MoE is in test_parity.py
(the `qwen3_moe` model_path)."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from lanner.errors import ConfigError
from lanner.layers.moe.block import MoEBlock
from lanner.layers.moe.strategies import MoERuntime
from lanner.models.moe import deepseek_moe_spec, qwen3_moe_spec


def deepseek_config(**kw):
    from transformers import DeepseekV3Config

    base = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=96)
    return DeepseekV3Config(**{**base, **kw})


def hf_deepseek_block(cfg, bias: bool):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    block = DeepseekV3MoE(cfg).float()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        if bias:  # large enough to change which experts are chosen
            block.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.3)
        else:
            block.gate.e_score_correction_bias.zero_()
    return block.eval()


def ours_from_hf(hf_block, spec, runtime=None) -> MoEBlock:
    block = MoEBlock(spec, hf_block.gate.weight.shape[1], runtime or MoERuntime(), 0).float()
    with torch.no_grad():
        block.gate.weight.copy_(hf_block.gate.weight)
        if block.gate.e_score_correction_bias is not None:
            block.gate.e_score_correction_bias.copy_(hf_block.gate.e_score_correction_bias)
        block.experts.w13.copy_(hf_block.experts.gate_up_proj)
        block.experts.w2.copy_(hf_block.experts.down_proj)
        shared = hf_block.shared_experts
        block.shared_experts.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        block.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
    return block


@pytest.mark.parametrize("bias", [True, False], ids=["correction-bias", "no-bias"])
def test_deepseek_block_matches_transformers(bias):
    """Without the bias (a router built without it: None, not zeros) against transformers with zeros."""
    cfg = deepseek_config()
    spec = deepseek_moe_spec(cfg)
    if not bias:
        spec = dataclasses.replace(spec, router=dataclasses.replace(spec.router, correction_bias=False))
    assert spec.sparse_layers == (1,)
    hf = hf_deepseek_block(cfg, bias)
    ours = ours_from_hf(hf, spec)
    assert (ours.gate.e_score_correction_bias is None) is not bias
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_weights, ref_ids = hf.gate(x)
        ids, weights = ours.gate(x)
        torch.testing.assert_close(ours(x), hf(x[None])[0], atol=1e-5, rtol=1e-5)
    order, ref_order = ids.long().sort(dim=-1), ref_ids.sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices))
    # only the kept groups' experts are chosen: 2 of 4 groups of 2 experts
    assert all(len({int(e) // 2 for e in row}) <= 2 for row in ids)


def test_correction_bias_selects_but_does_not_weight():
    cfg = deepseek_config(n_group=1, topk_group=1)
    hf = hf_deepseek_block(cfg, bias=True)
    ours = ours_from_hf(hf, deepseek_moe_spec(cfg))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.gate.e_score_correction_bias.fill_(0).index_fill_(0, torch.tensor([5]), 100.0)
        ids, weights = ours.gate(x)
        scores = torch.sigmoid(x @ ours.gate.weight.t())
    assert (ids == 5).any(dim=-1).all()  # chosen by every token
    chosen = scores.gather(1, ids.long())
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)  # weights from plain scores


def test_qwen3_moe_sparse_layers():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(num_hidden_layers=6, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                         mlp_only_layers=[3])
    assert qwen3_moe_spec(cfg).sparse_layers == (1, 5)
    assert qwen3_moe_spec(Qwen3MoeConfig(num_hidden_layers=2, num_experts=0)) is None


def test_padding_rows_route_nowhere_and_change_nothing():
    cfg = deepseek_config()
    runtime = MoERuntime()
    ours = ours_from_hf(hf_deepseek_block(cfg, True), deepseek_moe_spec(cfg), runtime)
    ours.shared_experts = None  # the routed part alone: a padding row's output is then zero
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(x[:4])
        runtime.num_real_tokens = torch.tensor([4])
        padded = ours(torch.cat([x[:4], x[4:] * 1e3]))  # garbage in the padding rows
        ids, weights = ours.gate(x, runtime.num_real_tokens)
    torch.testing.assert_close(padded[:4], full)
    assert padded[4:].abs().sum() == 0
    assert (ids[4:] == -1).all() and (weights[4:] == 0).all()


def test_empty_step_runs():
    cfg = deepseek_config()
    ours = ours_from_hf(hf_deepseek_block(cfg, True), deepseek_moe_spec(cfg))
    with torch.no_grad():
        assert ours(torch.zeros(0, 64)).shape == (0, 64)


def test_routing_record_holds_each_layers_choice():
    cfg = deepseek_config()
    runtime = MoERuntime(routing=torch.full((10, 2, 3), -7, dtype=torch.int32))
    ours = ours_from_hf(hf_deepseek_block(cfg, True), deepseek_moe_spec(cfg), runtime)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours(x)
        ids, _ = ours.gate(x)
    assert torch.equal(runtime.routing[:6, 0], ids) and (runtime.routing[6:] == -7).all()
    assert (runtime.routing[:, 1] == -7).all()  # the other layer's column is untouched


@pytest.mark.parametrize("backend", ["masked", "contiguous"])
def test_refused_strategy_falls_back_to_reference_and_says_why_once(backend, caplog):
    cfg = deepseek_config()
    hf = hf_deepseek_block(cfg, True)
    runtime = MoERuntime(backend=backend)
    ours = ours_from_hf(hf, deepseek_moe_spec(cfg), runtime)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger="lanner.layers.moe.strategies"), torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(ours(x), hf(x[None])[0], atol=1e-5, rtol=1e-5)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "CUDA" in refusals[0].getMessage()


def test_auto_picks_masked_for_small_steps_and_contiguous_above(caplog):
    runtime = MoERuntime(masked_max_tokens=4)
    assert [runtime.choice(n, True) for n in (0, 1, 4, 5, 8192)] == ["masked"] * 3 + ["contiguous"] * 2
    assert runtime.choice(1, False) == "reference"
    assert MoERuntime(backend="contiguous").choice(1, True) == "contiguous"
    with caplog.at_level(logging.WARNING, logger="lanner.layers.moe.strategies"):
        assert runtime.strategy(torch.zeros(3, 8), torch.zeros(2, 4, 8)).name == "reference"
    assert not caplog.records  # on the CPU the reference is no fallback: nothing to warn about


def test_checkpoint_missing_an_expert_is_refused(qwen3_moe_path, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lanner import LLM

    folder = tmp_path / "m"
    shutil.copytree(qwen3_moe_path, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="experts"):
        LLM(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=16)


# ---- routing replay: the experts recorded during generation, against a full-sequence forward ----

def hf_routing(hf, ids: list[int]) -> list[list[list[int]]]:
    """Per position of `ids`, per MoE layer, the sorted top-k experts of transformers' forward
    over the whole sequence (what a trainer recomputes from a rollout)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    k = hf.config.num_experts_per_tok
    layers = [logits.topk(k, dim=-1).indices.sort(dim=-1).values for logits in out.router_logits]
    return [[layer[p].tolist() for layer in layers] for p in range(len(ids))]


def sorted_routing(rows):
    return [[sorted(choice) for choice in row] for row in rows]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 7},
                                     {"num_kv_blocks": 12, "block_size": 4, "max_model_len": 64}],
                         ids=["plain", "chunked", "preempt"])
def test_recorded_routing_replays_identically(qwen3_moe_path, options):
    from conftest import hf_model, make_llm, random_prompts

    from lanner import SamplingParams

    hf = hf_model(qwen3_moe_path)
    llm = make_llm(qwen3_moe_path, enable_return_routed_experts=True, **options)
    prompts = random_prompts(5, 3, 25, hf.config.vocab_size, seed=7)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, return_routed_experts=True,
                            return_prompt_routed_experts=True)
    outs = llm.generate(prompts, params)
    if "num_kv_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        replay = hf_routing(hf, prompt + tokens)
        assert len(out.prompt_routed_experts) == len(prompt) - 1
        assert len(out.outputs[0].routed_experts) == len(tokens)
        # output token j came from the pass over position len(prompt) - 1 + j
        assert sorted_routing(out.outputs[0].routed_experts) == replay[len(prompt) - 1:-1]
        assert sorted_routing(out.prompt_routed_experts) == replay[:len(prompt) - 1]


def test_routing_with_prefix_hits_and_deltas(qwen3_moe_path):
    from conftest import hf_model, make_llm, random_prompts

    from lanner import SamplingParams
    from lanner.core.request import RequestOutputKind

    hf = hf_model(qwen3_moe_path)
    llm = make_llm(qwen3_moe_path, enable_return_routed_experts=True, block_size=4)
    prompt = random_prompts(1, 21, 21, hf.config.vocab_size, seed=8)[0]
    greedy = dict(temperature=0.0, max_tokens=6, ignore_eos=True, return_routed_experts=True)
    first = llm.generate([prompt], SamplingParams(**greedy))[0]
    again = llm.generate([prompt], SamplingParams(**greedy))[0]  # served from the prefix cache but the last block
    assert again.num_cached_tokens > 0 and again.prompt_routed_experts is None
    replay = hf_routing(hf, prompt + first.outputs[0].token_ids)[len(prompt) - 1:-1]
    assert sorted_routing(first.outputs[0].routed_experts) == replay
    assert sorted_routing(again.outputs[0].routed_experts) == replay
    engine = llm.engine
    engine.add_request("d", prompt, SamplingParams(**greedy, output_kind=RequestOutputKind.DELTA))
    pieces = []
    while engine.has_unfinished_requests():
        pieces += [o.outputs[0].routed_experts for o in engine.step()]
    assert sorted_routing([row for piece in pieces for row in piece]) == replay


def test_routing_options_are_refused_where_they_cannot_apply(qwen3_moe_path, qwen3_path):
    from conftest import make_llm

    from lanner import SamplingParams
    from lanner.errors import InvalidRequest

    llm = make_llm(qwen3_moe_path)
    with pytest.raises(InvalidRequest, match="enable_return_routed_experts"):
        llm.generate([[5, 6, 7]], SamplingParams(return_routed_experts=True))
    with pytest.raises(InvalidRequest, match="true or false"):
        SamplingParams(return_routed_experts="yes")
    for option in ({"enable_return_routed_experts": True}, {"moe_backend": "masked"}):
        with pytest.raises(ConfigError, match="no MoE layers"):
            make_llm(qwen3_path, **option)
    with pytest.raises(ConfigError, match="speculative"):
        make_llm(qwen3_moe_path, enable_return_routed_experts=True,
                 speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_server_returns_routed_experts(qwen3_moe_path):
    from conftest import make_llm
    from fastapi.testclient import TestClient

    from lanner import SamplingParams
    from lanner.config import EngineConfig, ServerConfig
    from lanner.engine.engine import LLMEngine
    from lanner.server.app import build_app
    from lanner.serving.async_engine import AsyncEngine

    options = dict(model=qwen3_moe_path, device="cpu", dtype="float32", num_kv_blocks=64,
                   enable_return_routed_experts=True)
    engine = AsyncEngine(LLMEngine(EngineConfig.from_kwargs(**options)))
    want = make_llm(qwen3_moe_path, enable_return_routed_experts=True).generate(
        [[5, 9, 33, 2]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, return_routed_experts=True))
    want = want[0].outputs[0].routed_experts
    body = {"model": "m", "prompt": [5, 9, 33, 2], "temperature": 0, "max_tokens": 5, "ignore_eos": True,
            "return_routed_experts": True}
    with TestClient(build_app(engine, ServerConfig(served_model_name=["m"]))) as http:
        whole = http.post("/v1/completions", json=body).json()["choices"][0]["routed_experts"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
        streamed = [row for c in chunks for choice in json.loads(c)["choices"] for row in choice["routed_experts"]]
        plain = http.post("/v1/completions", json={**body, "return_routed_experts": False}).json()["choices"][0]
        refused = http.post("/v1/completions", json={**body, "return_prompt_routed_experts": True})
    assert whole == want and streamed == want and "routed_experts" not in plain
    assert refused.status_code == 400
    engine.shutdown()


@pytest.mark.parametrize("kw", [
    dict(top_k=2, scoring="softmax", renormalize=False),
    dict(top_k=3, scoring="softmax", renormalize=True),
    dict(top_k=3, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2, scaling=2.5, bias=True),
    dict(top_k=4, scoring="sigmoid", renormalize=True, num_groups=3, topk_groups=2, bias=False),  # 12 experts
    dict(top_k=2, scoring="sigmoid", renormalize=False, num_groups=12, topk_groups=5, bias=True),  # groups of one
], ids=["softmax", "softmax-renorm", "grouped-bias", "groups-of-4-no-bias", "groups-of-1"])
def test_routing_kernel_matches_reference(kw):
    """The Triton routing kernel (TRITON_INTERPRET=1 on the CPU) against the torch reference,
    padding rows included."""
    from lanner.kernels.moe.routing import route
    from lanner.kernels.moe.routing_reference import route_reference

    g = torch.Generator().manual_seed(9)
    experts = 12 if kw.get("num_groups") in (3, 12) else 8
    logits = torch.randn(9, experts, generator=g)
    kw = dict(kw, bias=torch.randn(experts, generator=g) * 0.2 if kw.get("bias") else None)
    num_real = torch.tensor([7])
    ids, weights = route(logits, num_real=num_real, **kw)
    ref_ids, ref_weights = route_reference(logits, num_real=num_real, **kw)
    order, ref_order = ids.long().sort(dim=-1), ref_ids.long().sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices))
    assert (ids[7:] == -1).all() and (weights[7:] == 0).all()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_routing_kernel_picks_real_experts_from_nan_logits(scoring):
    """A row of NaN logits (garbage reaching the router) still picks expert ids inside the layer:
    an id past the experts once sent the layout kernels' writes out of bounds on the GPU."""
    from lanner.kernels.moe.routing import route

    logits = torch.randn(4, 12)
    logits[1] = float("nan")
    logits[2, :5] = float("nan")
    ids, _ = route(logits, top_k=4, scoring=scoring, renormalize=True, num_groups=3, topk_groups=2)
    assert ((ids >= 0) & (ids < 12)).all()
    if scoring == "sigmoid":  # (softmax spreads a NaN over its whole row) the NaN experts rank last
        assert ids[2].min() >= 5


def test_probes_answer_and_never_raise():
    from lanner.layers.moe.strategies import STRATEGIES

    for strategy in STRATEGIES.values():
        for args in [(torch.zeros(2, 8), torch.zeros(2, 4, 8)), (None, None), ("x", 3)]:
            ok, reason = strategy.probe(*args)
            assert isinstance(ok, bool) and isinstance(reason, str) and (ok or reason)
    assert STRATEGIES["reference"].probe(None, None) == (True, "")
    assert STRATEGIES["masked"].probe(None, None)[0] is False


def test_speculative_decoding_through_moe_layers_keeps_greedy_output(qwen3_moe_path):
    """Verify steps (k+1 rows per request, padded like decode rows) route every row."""
    from conftest import make_llm, random_prompts

    from lanner import SamplingParams

    prompts = [p * 3 for p in random_prompts(4, 4, 8, 500, seed=10)]  # repetitive: n-gram drafts get accepted
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = make_llm(qwen3_moe_path).generate(prompts, params)
    spec = make_llm(qwen3_moe_path, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    drafted = spec.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
    assert spec.engine.speculator.stats.verifications > 0


def test_unsupported_routings_and_options_are_refused():
    from conftest import make_llm

    from lanner.errors import UnsupportedModel
    from lanner.layers.moe.router import RouterSpec

    with pytest.raises(UnsupportedModel, match="topk_method"):
        deepseek_moe_spec(deepseek_config(topk_method="group_limited_greedy"))
    with pytest.raises(UnsupportedModel, match="scoring_func"):
        deepseek_moe_spec(deepseek_config(scoring_func="softmax"))
    with pytest.raises(ValueError, match="kept groups"):
        RouterSpec(num_experts=8, top_k=5, scoring="sigmoid", num_groups=4, topk_groups=2)
    with pytest.raises(ConfigError, match="moe_backend"):
        make_llm("unused", moe_backend="fast")


def test_correction_bias_loads_when_present_and_stays_zero_when_absent():
    from torch import nn

    from lanner.models.loader import load_weights

    cfg = deepseek_config()
    hf = hf_deepseek_block(cfg, bias=True)
    tensors = {f"mlp.{k}": v for k, v in hf.state_dict().items() if not k.startswith("experts.")}
    for e in range(cfg.n_routed_experts):
        inter = cfg.moe_intermediate_size
        tensors[f"mlp.experts.{e}.gate_proj.weight"] = hf.experts.gate_up_proj[e, :inter]
        tensors[f"mlp.experts.{e}.up_proj.weight"] = hf.experts.gate_up_proj[e, inter:]
        tensors[f"mlp.experts.{e}.down_proj.weight"] = hf.experts.down_proj[e]
    for with_bias in (True, False):
        holder = nn.Module()
        holder.mlp = MoEBlock(deepseek_moe_spec(cfg), 64, MoERuntime(), 0).float()
        holder.packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        given = {k: v for k, v in tensors.items() if with_bias or not k.endswith("e_score_correction_bias")}
        load_weights(holder, given.items())
        bias = holder.mlp.gate.e_score_correction_bias
        assert torch.equal(bias, hf.gate.e_score_correction_bias) if with_bias else not bias.any()
        if with_bias:
            x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
            with torch.no_grad():
                torch.testing.assert_close(holder.mlp(x), hf(x[None])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="expert"):
        holder = nn.Module()
        holder.mlp = MoEBlock(deepseek_moe_spec(cfg), 64, MoERuntime(), 0)
        load_weights(holder, [("mlp.experts.8.up_proj.weight", torch.zeros(32, 64))])


def test_dense_reference_equals_the_reference():
    """The capture-safe fallback (every expert over every token) computes what the loop does."""
    from lanner.kernels.moe.reference import moe_reference, moe_reference_dense

    g = torch.Generator().manual_seed(11)
    x, w13, w2 = torch.randn(6, 16, generator=g), torch.randn(4, 24, 16, generator=g), torch.randn(4, 16, 12, generator=g)
    ids = torch.tensor([[0, 2], [3, 3], [1, -1], [-1, -1], [2, 0], [1, 2]], dtype=torch.int32)
    ids[1, 1] = 0
    weights = torch.rand(6, 2, generator=g)
    torch.testing.assert_close(moe_reference_dense(x, w13, w2, ids, weights), moe_reference(x, w13, w2, ids, weights))


def test_prompt_routing_in_deltas_with_chunked_prefill_and_no_prompt_rows_unless_asked(qwen3_moe_path):
    from conftest import hf_model, make_llm, random_prompts

    from lanner import SamplingParams
    from lanner.core.request import RequestOutputKind, merge_deltas

    hf = hf_model(qwen3_moe_path)
    engine = make_llm(qwen3_moe_path, enable_return_routed_experts=True, max_num_batched_tokens=4).engine
    prompt = random_prompts(1, 12, 12, hf.config.vocab_size, seed=12)[0]
    base = dict(temperature=0.0, max_tokens=3, ignore_eos=True, return_routed_experts=True)
    engine.add_request("p", prompt, SamplingParams(**base, return_prompt_routed_experts=True,
                                                   output_kind=RequestOutputKind.DELTA))
    engine.add_request("o", prompt, SamplingParams(**base))
    outputs = {"p": [], "o": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
        if "o" in engine.groups:  # output-only routing: no prompt position is read back but the last
            record = engine.groups["o"][0].routed_experts
            assert all(row is None for row in record[:len(prompt) - 1])
    merged = merge_deltas(outputs["p"])
    replay = hf_routing(hf, prompt + merged.outputs[0].token_ids)
    assert sorted_routing(merged.prompt_routed_experts) == replay[:len(prompt) - 1]
    assert sorted_routing(merged.outputs[0].routed_experts) == replay[len(prompt) - 1:-1]
    assert sorted_routing(outputs["o"][-1].outputs[0].routed_experts) == replay[len(prompt) - 1:-1]


def test_mtp_layer_over_a_moe_target_is_refused():
    from transformers import Qwen3MoeConfig

    from lanner.errors import UnsupportedModel
    from lanner.models.mtp import MtpLayer
    from lanner.models.registry import ARCHITECTURES, decoder_spec

    cfg = Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, hidden_size=32, head_dim=8,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedModel, match="mixture-of-experts"):
        MtpLayer(decoder_spec(cfg, ARCHITECTURES["Qwen3MoeForCausalLM"](cfg)), None)


def test_lanner_generate_runs_a_qwen3_moe_folder(qwen3_moe_path):
    """`lanner generate --model <Qwen3-MoE folder>`: the command line, end to end, against the
    offline API's greedy completion."""
    import subprocess
    import sys

    from conftest import make_llm

    from lanner import SamplingParams

    want = make_llm(qwen3_moe_path).generate("def f(x):", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                             use_tqdm=False)[0].outputs[0].text
    out = subprocess.run([sys.executable, "-m", "lanner.cli", "generate", "def f(x):", "--model", qwen3_moe_path,
                          "--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max-tokens", "6",
                          "--ignore-eos"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "def f(x):" + want in out.stdout
