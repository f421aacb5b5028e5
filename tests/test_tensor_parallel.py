"""Tensor parallelism on the CPU: ranks are processes that meet over gloo (lanner starts them, or
two "nodes" start one each, or torchrun does), and a sharded engine gives the greedy tokens of
one rank. A rank that raises or dies makes the engine fail its requests and report itself dead
within a bounded time."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_llm, random_prompts

from lanner import SamplingParams
from lanner.errors import ConfigError, EngineDead, InvalidRequest
from lanner.executor.worker import free_port

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def shared_prefix_prompts(vocab: int) -> list[list[int]]:
    """Prompts of several blocks, two of them sharing their first blocks (prefix cache hits)."""
    prompts = random_prompts(4, 20, 40, vocab, seed=3)
    return prompts + [prompts[0] + prompts[1][:7]]


@pytest.mark.parametrize("name,options", [("qwen3", {}), ("qwen3", {"overlap_scheduling": False}), ("llama", {}),
                                          ("qwen3_moe", {}), ("qwen3_moe", {"enable_expert_parallel": True})],
                         ids=["qwen3", "qwen3-no-overlap", "llama", "qwen3_moe-experts-split",
                              "qwen3_moe-expert-parallel"])
def test_two_ranks_give_the_greedy_tokens_of_one(name, options, request):
    """Chunked prefill (16-token steps), prefix hits and forced preemption (few KV blocks) on two
    ranks give the tokens of one rank without them (whose parity with transformers
    tests/test_parity.py checks; transformers' own generate() differs from its full forward on
    one of these prompts with the MoE model, so it is not the reference here)."""
    path = request.getfixturevalue(f"{name}_path")
    prompts = [{"prompt_token_ids": p} for p in shared_prefix_prompts(512)]
    want = [o.outputs[0].token_ids for o in make_llm(path).generate(prompts, GREEDY, use_tqdm=False)]
    llm = make_llm(path, tensor_parallel_size=2, max_num_batched_tokens=16, num_kv_blocks=20, block_size=4,
                   **options)
    try:
        if options.get("enable_expert_parallel"):  # rank 0 holds experts 0-3 of 8, rank 1 experts 4-7
            experts = llm.engine.runner.model.model.layers[1].mlp.experts
            assert (experts.first, experts.count, experts.w13.shape[0]) == (0, 4, 4)
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # fills the prefix cache
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        metrics = llm.get_metrics()
        assert metrics["num_preemptions"] > 0 and metrics["prefix_cache_hits"] > 0
    finally:
        llm.engine.shutdown()


def test_four_ranks_replicate_kv_heads_and_split_a_tied_vocabulary(qwen3_tied_path):
    """Two KV heads over four ranks: each KV head is held by two ranks; the tied embedding and
    head are split by vocabulary rows; seeded sampling draws the same tokens as one rank (with
    penalties, and with logprobs, which only rank 0 computes)."""
    prompts = random_prompts(3, 5, 20, 512, seed=5)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True)
    scored = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, logprobs=2, prompt_logprobs=1,
                            max_tokens=10, seed=3, ignore_eos=True)

    def run(llm):
        outs = [llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                for params in (GREEDY, sampled, scored)]
        return [[o.outputs[0].token_ids for o in run] for run in outs], \
            [[sorted(e) for e in o.outputs[0].logprobs] + [sorted(e) for e in o.prompt_logprobs[1:]] for o in outs[2]]

    want = run(make_llm(qwen3_tied_path))
    llm = make_llm(qwen3_tied_path, tensor_parallel_size=4)
    try:
        assert llm.engine.runner.model.spec.num_kv_heads == 1 and llm.engine.runner.model.spec.kv_shards == 2
        assert run(llm) == want
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle3", "mtp"])
def test_speculative_decoding_on_two_ranks_keeps_the_tokens_of_one(method):
    """lanner-tiny with each proposer: the target split over two ranks, the draft whole on each
    (its 3 heads would not split), the same greedy tokens as one rank, drafts accepted."""
    from lanner import LLM

    prompts = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\nimport sys\n\n\ndef main():\n"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    spec = {"method": method, "num_speculative_tokens": 3}
    want = [o.outputs[0].token_ids for o in LLM(device="cpu", dtype="float32").generate(prompts, params,
                                                                                         use_tqdm=False)]
    llm = LLM(device="cpu", dtype="float32", tensor_parallel_size=2, speculative_config=spec)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
        assert llm.get_metrics()["spec_accepted_tokens"] > 0
    finally:
        llm.engine.shutdown()


def test_plans_keep_the_other_ranks_copies_of_the_requests_equal_to_rank_0s():
    """What the runner reads of each request, after steps that append tokens and blocks, a
    preemption (a new, empty block list) and a finished request, through pickled plans."""
    import pickle
    import random

    from lanner.core.request import Request, RequestStatus
    from lanner.core.schedule import SchedulerOutput
    from lanner.executor.worker import STEP_FIELDS, Mirror, Ranks

    rng = random.Random(0)
    reqs = [Request(f"r{i}", None, [rng.randrange(500) for _ in range(rng.randrange(3, 30))],
                    SamplingParams(prompt_logprobs=1 if i == 0 else None), {2}, i) for i in range(6)]
    ranks, mirror = Ranks([]), Mirror()
    for step in range(40):
        live = [r for r in reqs if not r.finished]
        for r in live:
            r.num_computed_tokens += 1
            r.all_token_ids.append(step)
            r.output_token_ids.append(step)
            r.draft_token_ids = [step] * (step % 3)
            if step % 4 == 0:
                r.block_ids.append(100 * step + int(r.request_id[1:]))
        if step == 10:
            reqs[1].block_ids = []  # preempted: its blocks freed
            reqs[1].num_computed_tokens = 0
        if step == 20:
            reqs[2].status = RequestStatus.FINISHED
        if reqs[0].prompt_logprobs is not None:
            reqs[0].prompt_logprobs.append(None)
        scheduled = [r for r in reqs if not r.finished and rng.random() < 0.7]
        sched = SchedulerOutput([(r, 1) for r in scheduled], drafts={r: r.draft_token_ids for r in scheduled})
        got = mirror.apply(pickle.loads(pickle.dumps(ranks.plan(sched))))
        for (theirs, n), (ours, m) in zip(got.scheduled, sched.scheduled):
            assert n == m and theirs is not ours and theirs.request_id == ours.request_id
            for name in (*STEP_FIELDS, "all_token_ids", "output_token_ids", "block_ids", "prompt_token_ids", "seed"):
                assert getattr(theirs, name) == getattr(ours, name), (step, name)
            assert (theirs.prompt_logprobs is None) == (ours.prompt_logprobs is None)
            assert theirs.prompt_logprobs is None or len(theirs.prompt_logprobs) == len(ours.prompt_logprobs)
        assert {r.request_id: d for r, d in got.drafts.items()} == {r.request_id: d for r, d in sched.drafts.items()}
    assert "r2" not in mirror.requests and "r2" not in ranks.known  # forgotten once finished


def test_expert_parallel_dispatch_keeps_this_ranks_experts_and_a_rank_with_no_tokens_adds_zeros(monkeypatch):
    import torch

    from lanner.distributed import TP
    from lanner.kernels.moe.reference import moe_reference
    from lanner.layers.moe.dispatch import ExpertParallelDispatcher
    from lanner.layers.moe.experts import Experts, expert_ranks

    assert expert_ranks(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1] and expert_ranks(6, 3) == [0, 0, 1, 1, 2, 2]
    monkeypatch.setattr(TP, "size", 2)
    monkeypatch.setattr(TP, "rank", 1)
    monkeypatch.setattr(TP, "expert_parallel", True)
    experts = Experts(8, 16, 8)
    assert (experts.first, experts.count) == (4, 4)
    assert experts.shard(experts.w2, (2, 0)) is None and experts.shard(experts.w2, (5, 0)).shape == (16, 8)
    x = torch.randn(3, 16)
    ids = torch.tensor([[5, 0], [1, 2], [7, 4]], dtype=torch.int32)
    local = ExpertParallelDispatcher(experts.first, experts.count).dispatch(x, ids, torch.rand(3, 2))
    assert local.ids.tolist() == [[1, -1], [-1, -1], [3, 0]]
    none_here = ExpertParallelDispatcher(4, 4).dispatch(x, ids[1:2], torch.rand(1, 2))  # only rank 0's experts
    w13, w2 = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    assert torch.equal(moe_reference(x[1:2], w13, w2, none_here.ids, none_here.weights), torch.zeros(1, 16))


def test_shapes_that_do_not_split_and_unsupported_options_are_refused(qwen3_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(3\)"):
        make_llm(qwen3_path, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="multiple of nnodes"):
        make_llm(qwen3_path, tensor_parallel_size=3, nnodes=2, master_port=1234)
    with pytest.raises(ConfigError, match="needs tensor_parallel_size > 1"):
        make_llm(qwen3_path, enable_expert_parallel=True)
    with pytest.raises(ConfigError, match="no MoE layers"):
        make_llm(qwen3_path, tensor_parallel_size=2, enable_expert_parallel=True)
    llm = make_llm(qwen3_path, tensor_parallel_size=2)
    try:
        with pytest.raises(InvalidRequest, match="logits_processors"):
            llm.generate("x", SamplingParams(logits_processors=[lambda ids, row: row]), use_tqdm=False)
        assert llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids  # the engine goes on
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_failed_rank_fails_the_requests_and_the_engine_reports_dead(qwen3_path, monkeypatch, how):
    if how == "raises":  # the rank's 3rd step raises (the rank process reads this at start)
        monkeypatch.setenv("LANNER_TEST_RANK_FAILS_AT_STEP", "3")
    llm = make_llm(qwen3_path, tensor_parallel_size=2, distributed_timeout_s=20)
    worker = llm.engine.ranks.processes[0]
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": [5] * 10}, GREEDY)
    engine.step()
    if how == "dies":
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
    start = time.monotonic()
    with pytest.raises(EngineDead, match="tensor-parallel step failed"):
        for _ in range(20):
            engine.step()
    assert time.monotonic() - start < 15  # the failure is seen at once, not after the timeout
    assert not worker.is_alive()
    assert engine.fail_step() == ["a"] and not engine.has_unfinished_requests()
    with pytest.raises(EngineDead):
        engine.add_request("b", "more", GREEDY)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lanner.cli", "generate", "def f(x):", "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-tokens", "8", "--ignore-eos", *args]


def completion(out: str) -> str:
    return out[out.rindex("def f(x):"):]


@pytest.mark.parametrize("launcher", ["lanner", "torchrun"])
def test_two_nodes_of_one_rank_each_give_the_output_of_one_rank(qwen3_path, launcher):
    """Two processes as two machines: `--nnodes 2 --node-rank i` on each, or torchrun's
    two-node command; node 0 prints the completion of a one-rank engine."""
    one = subprocess.run(cli("--model", qwen3_path), capture_output=True, text=True, timeout=120, check=False)
    assert one.returncode == 0, one.stderr
    port = str(free_port())
    if launcher == "lanner":
        commands = [cli("--model", qwen3_path, "-tp", "2", "--nnodes", "2", "--node-rank", str(i),
                        "--master-addr", "127.0.0.1", "--master-port", port) for i in (0, 1)]
    else:
        commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                     "--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", port, "-m",
                     *cli("--model", qwen3_path, "-tp", "2")[2:]] for i in (0, 1)]
    nodes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        outs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    assert completion(outs[0][0]) == completion(one.stdout)
    assert "def f(x):" not in outs[1][0]  # node 1 hosts a rank only


def serve_two_ranks(path: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lanner serve PATH -tp 2` (its engine process starts the second rank), once healthy."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lanner.cli", "serve", path, "-tp", "2", "--device", "cpu",
                             "--dtype", "float32", "--port", str(port), "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)


def test_serve_with_two_ranks_answers_as_one_rank_and_stops_them(qwen3_path):
    """With the openai client: greedy completions equal one rank's; SIGTERM ends the server, its
    engine process and both ranks."""
    import openai

    want = make_llm(qwen3_path).generate("def f(x):", GREEDY, use_tqdm=False)[0].outputs[0].text
    proc, base = serve_two_ranks(qwen3_path)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        for _ in range(2):
            got = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 20  # the engine process and the second rank end too
        while subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, check=False).stdout:
            assert time.monotonic() < deadline, "a process of the server outlived it"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_rank_failing_under_the_server_fails_the_request_and_the_server_reports_dead(qwen3_path):
    import httpx
    import openai

    proc, base = serve_two_ranks(qwen3_path, {"LANNER_TEST_RANK_FAILS_AT_STEP": "4"})
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        start = time.monotonic()
        with pytest.raises(openai.APIError):
            client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert time.monotonic() - start < 30
        assert httpx.get(f"{base}/health", timeout=5).status_code == 503
        with pytest.raises(openai.APIError):  # refused at once
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
