"""Verify steps attend one decode row per token (so they replay the decode CUDA graphs), the seed
pitfalls of padded verify batches, and the adaptive policy that pauses drafts that keep failing."""
from __future__ import annotations

import pytest
import torch

from lanner.core.batch import ForwardBatch
from lanner.core.request import SamplingParams
from lanner.kernels.attention.reference import attend
from test_speculative import CODE, SPEC, llm

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def want():
    return [o.outputs[0].token_ids for o in llm().generate(CODE, GREEDY, use_tqdm=False)]


def recorded_steps(runner) -> list:
    """(scheduled (request, tokens, drafts, block ids), batch, positions, block tables) of every step the runner
    prepares (the batch's tensors are static buffers and block lists grow: copied now)."""
    steps, prepare = [], runner.prepare

    def recording(sched):
        out = prepare(sched)
        batch = out[0]
        steps.append(([(req, n, len(req.draft_token_ids), list(req.block_ids)) for req, n in sched.scheduled],
                      batch, batch.positions[:batch.num_real_tokens].tolist(), [list(t) for t in batch.block_tables]))
        return out

    runner.prepare = recording
    return steps


def assert_verify_rows_are_decode_rows(steps) -> int:
    verify = [step for step in steps if any(d for _, _, d, _ in step[0])]
    for sched, batch, positions, tables in verify:
        rows = batch.num_real_tokens
        assert rows == sum(n for _, n, _, _ in sched) > len(sched)
        assert batch.query_lens == [1] * rows and batch.is_decode_only and batch.sampling_rows_are_tokens
        assert batch.seq_lens == [p + 1 for p in positions]
        assert tables == [blocks for _, n, _, blocks in sched for _ in range(n)]
    return len(verify)


def test_verify_steps_attend_one_decode_row_per_token(want):
    """Each row of a verify step (a request's last token and its drafts) is planned as a decode
    row of its own: one query, its position + 1 keys, its request's block table; the outputs are
    those of decoding without speculation."""
    spec = llm(speculative_config=SPEC)
    steps = recorded_steps(spec.engine.runner)
    got = [o.outputs[0].token_ids for o in spec.generate(CODE, GREEDY, use_tqdm=False)]
    assert got == want
    assert assert_verify_rows_are_decode_rows(steps) > 0 and spec.engine.speculator.stats.accepted > 0


def test_the_triton_decode_kernel_verifies_like_transformers(qwen3_path):
    """The same through the GPU backend's plan and Triton decode kernel (the interpreter here), on
    a tiny random Qwen3: greedy tokens equal transformers'."""
    from conftest import hf_greedy, hf_model, make_llm, random_prompts

    hf = hf_model(qwen3_path)
    seg = random_prompts(2, 6, 6, hf.config.vocab_size, seed=4)
    prompts = [s + s + s[:3] for s in seg]  # lookup finds the rest of the segment
    spec = make_llm(qwen3_path, attention_backend="triton", block_size=4,
                    speculative_config={**SPEC, "adaptive": False})
    steps = recorded_steps(spec.engine.runner)
    outs = spec.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=8),
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, 8)
    assert assert_verify_rows_are_decode_rows(steps) > 0


def test_a_prompt_chunk_keeps_its_prefill_plan():
    spec = llm(speculative_config=SPEC, max_num_batched_tokens=16)
    steps = recorded_steps(spec.engine.runner)
    spec.generate(CODE, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    chunks = [(sched, batch) for sched, batch, _, _ in steps if any(n > 1 + d for _, n, d, _ in sched)]
    assert chunks and all(not batch.is_decode_only and len(batch.query_lens) == len(sched) for sched, batch in chunks)


def small_caches(blocks=16, block_size=4, kv_heads=2, head_dim=16, layers=1):
    g = torch.Generator().manual_seed(0)
    shape = (blocks, block_size, kv_heads, head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(layers)]


def test_a_padded_verify_plan_repeats_the_last_length_and_pads_with_empty_rows():
    """Seed pitfalls (RTP-LLM #969, SGLang #22299): in a verify batch padded up to a graph size,
    the padded tail of the cumulative query lengths repeats the last real value, padding rows
    have no keys (so their attention output is zero), and the largest query length is the
    whole batch's longest query gets its tiles, wherever it sits."""
    from lanner.layers.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend(small_caches(), 4, 16, 96, 4, max_tokens=96)
    # two requests verifying 2 drafts each, at positions 5..7 and 9..11, as 6 decode rows padded to 8
    positions = [5, 6, 7, 9, 10, 11]
    tables = [[3, 1]] * 3 + [[0, 2, 5]] * 3
    batch = ForwardBatch(torch.zeros(8, dtype=torch.long), torch.tensor(positions + [0, 0]),
                         torch.full((8,), -1), [1] * 6, [p + 1 for p in positions], tables, torch.arange(6), 6)
    backend.plan(batch, num_padded_seqs=8)
    assert backend.seq_lens[:8].tolist() == [6, 7, 8, 10, 11, 12, 0, 0]
    assert backend.query_start[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6]
    assert backend.block_tables[:6, :3].tolist() == [[3, 1, 0]] * 3 + [[0, 2, 5]] * 3
    assert backend.decode_only and backend.rows == 8
    # a mixed batch: the longest query (nine tiles of 8 positions x 2 heads) in the middle gets all
    # its tiles
    mixed = ForwardBatch(torch.zeros(75, dtype=torch.long), torch.zeros(75, dtype=torch.long),
                         torch.full((75,), -1), [2, 70, 3], [4, 72, 3], [[0], list(range(1, 19)), [4]],
                         torch.arange(3), 75)
    backend.plan(mixed)
    assert backend.query_start[:4].tolist() == [0, 2, 72, 75]
    # the count, then tiles by keys, most first
    assert backend.tiles[:12].tolist() == [[11, 0]] + [[1, b] for b in range(8, -1, -1)] + [[0, 0], [2, 0]]
    assert backend.num_prefill_programs == 11  # one a tile
    # planned for a graph of 80 tokens: as many programs as any step of 80 tokens may need (10 for
    # the tiles of one long prompt, 4 x 132 multiprocessors / 2 KV heads for short queries), up to
    # the most tiles 80 tokens in up to 16 sequences have (10 + 16)
    backend.plan(mixed, graph_tokens=80)
    assert backend.num_prefill_programs == 26 and not backend.decode_only


def test_decode_rows_of_a_verify_batch_equal_causal_attention_and_padding_is_zero():
    """The decode kernel over a padded verify batch's rows gives, for each real row, causal
    attention over its request's context up to its own position (what a prefill kernel would
    compute for the k+1 queries), and zeros for the padding rows."""
    from lanner.layers.attention.triton_backend import TritonAttentionBackend

    caches = small_caches()
    backend = TritonAttentionBackend(caches, 4, 16, 32, 4, max_tokens=96)
    positions, block_table = [5, 6, 7], [3, 1]
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 4, 16, generator=g), torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    slots = torch.tensor([block_table[p // 4] * 4 + p % 4 for p in positions] + [-1])
    batch = ForwardBatch(torch.zeros(4, dtype=torch.long), torch.tensor(positions + [0]), slots, [1] * 3,
                         [p + 1 for p in positions], [block_table] * 3, torch.arange(3), 3)
    backend.plan(batch, num_padded_seqs=4)
    out = backend.forward(0, q, k, v, 0.25)
    k_flat, v_flat = (c.view(-1, 2, 16) for c in caches[0])
    context = torch.tensor([block_table[p // 4] * 4 + p % 4 for p in range(8)])
    for row, p in enumerate(positions):
        want = attend(q[row:row + 1], k_flat[context[:p + 1]], v_flat[context[:p + 1]], 0.25, 2)
        torch.testing.assert_close(out[row:row + 1], want, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(out[3]) == 0


def test_zeroing_a_padded_verify_batch_uses_the_raw_token_count(want, monkeypatch):
    """Piecewise steps (the path of verify batches over the largest decode graph) zero the
    attention output of the padding rows from the raw, pre-padding token count: rows filled
    with garbage before the step are zero after it, and the outputs do not change."""
    from lanner.executor.piecewise import PiecewiseGraphs

    forward, checked = PiecewiseGraphs.forward, []

    def poisoned(self, batch, backend):
        size = batch.input_ids.shape[0]
        self.bufs.rows(size).attn_out.fill_(float("nan"))
        hidden = forward(self, batch, backend)
        attn = self.bufs.rows(size).attn_out
        if batch.verify_rows and size > batch.num_real_tokens:
            checked.append(size - batch.num_real_tokens)
        assert torch.count_nonzero(attn[batch.num_real_tokens:]) == 0
        assert torch.isfinite(attn[:batch.num_real_tokens]).all()
        return hidden

    monkeypatch.setattr(PiecewiseGraphs, "forward", poisoned)
    spec = llm(speculative_config=SPEC, piecewise_graphs=True, piecewise_sizes=[8, 16, 64])
    got = [o.outputs[0].token_ids for o in spec.generate(CODE, GREEDY, use_tqdm=False)]
    assert got == want
    assert checked  # padded verify steps (decode rows) were among them


class WrongDrafts:
    """Drafts whose first token is never the target's greedy next token."""

    def __init__(self, want: dict, vocab: int):
        self.want, self.vocab, self.proposed = want, vocab, 0

    def __call__(self, req, k):
        nxt = self.want[tuple(req.prompt_token_ids)][len(req.output_token_ids)]
        self.proposed += 1
        return [(nxt + 1) % self.vocab] * k


@pytest.mark.parametrize("policy", ["pausing", "probing every step", "off"])
def test_drafts_that_keep_failing_probe_and_pause(policy, monkeypatch):
    """With every draft rejected, a request of a small batch verifies k drafts three times, then
    probes with one draft every step; in a batch that pauses (here a batch of 3 once
    PAUSE_FROM_BATCH is 1) it starts by probing and pauses 2, 4, 8, ... steps between probes. The
    outputs stay those without speculation. Without the policy every step verifies k drafts."""
    from lanner.engine.speculation import Speculator

    plain = llm()
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    outs = plain.generate(CODE, params, use_tqdm=False)
    want = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in outs}
    if policy == "pausing":
        monkeypatch.setattr(Speculator, "PAUSE_FROM_BATCH", 1)
    spec = llm(speculative_config={**SPEC, "adaptive": policy != "off"})
    spec.engine.speculator.proposer.drafts = wrong = WrongDrafts(want, spec.engine.vocab_size)
    got = spec.generate(CODE, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in outs]
    stats, k = spec.engine.speculator.stats, SPEC["num_speculative_tokens"]
    assert stats.accepted == 0 and stats.verifications == wrong.proposed
    # 98 decode steps per request may draft (not the last one); pausing: 2 + 1 + 1 + 1 + 1 + 1 verify
    verifications = {"pausing": 7, "probing every step": 98, "off": 98}[policy]
    assert stats.verifications == verifications * len(CODE)
    # k drafts (or fewer where max_tokens leaves no room for them); a request of a large batch
    # starts by probing with one
    drafts = {"pausing": 7, "probing every step": 3 * k + 95, "off": sum(min(k, 98 - i) for i in range(98))}
    assert stats.drafts == drafts[policy] * len(CODE)
    # paused requests draft nothing next step, so their steps overlap like plain decoding (n-gram
    # drafts are looked up on the host: a drafting step is read back first)
    assert (spec.engine.num_overlapped_steps > 60) == (policy == "pausing")


def test_one_accepted_draft_ends_the_run_of_misses():
    from lanner.config import SpeculativeConfig
    from lanner.core.request import Request
    from lanner.engine.speculation import Speculator

    speculator = Speculator(SpeculativeConfig(**SPEC))
    # (accepted, pause after it), and whether it probes after it: in a small batch after 3 misses in
    # a row, in one that pauses after 2 (the pause itself counts down only in a batch that pauses)
    outcomes = [(0, 0), (0, 2), (0, 4), (1, 0), (0, 0), (0, 2)]
    for pausing, probing in ((False, [0, 0, 1, 0, 0, 0]), (True, [0, 1, 1, 0, 0, 1])):
        speculator.pausing = pausing
        req = Request("r", None, [1, 2], SamplingParams(), set(), 0)
        for (accepted, pause), probes in zip(outcomes, probing):
            speculator.record(req, [7] * 4, [7] * accepted + [8] * (5 - accepted))
            assert req.spec_pause == pause and req.spec_probing == bool(probes)
            req.spec_pause = 0


def test_in_a_large_batch_a_request_earns_its_k_drafts():
    """Below PAUSE_FROM_BATCH running requests a request drafts k tokens from its first decode
    step; from it on, it starts with one and drafts k once one was accepted."""
    from lanner.config import SpeculativeConfig
    from lanner.core.request import Request
    from lanner.engine.speculation import Speculator

    speculator = Speculator(SpeculativeConfig(**SPEC))
    k = speculator.k

    def decoding(n: int) -> list[Request]:
        reqs = [Request(str(i), None, [5, 6, 7, 8, 9, 10] * 3, SamplingParams(max_tokens=50), set(), 0)
                for i in range(n)]
        for req in reqs:
            req.speculative, req.num_computed_tokens = True, req.num_tokens - 1
        return reqs

    small, large = decoding(Speculator.PAUSE_FROM_BATCH - 1), decoding(Speculator.PAUSE_FROM_BATCH)
    speculator.propose(small)
    assert [len(r.draft_token_ids) for r in small] == [k] * len(small)
    speculator.propose(large)
    assert [len(r.draft_token_ids) for r in large] == [1] * len(large)
    speculator.record(large[0], large[0].draft_token_ids, large[0].draft_token_ids + [0])  # accepted
    speculator.record(large[1], large[1].draft_token_ids, [0, 0])  # rejected
    speculator.propose(large)
    assert [len(r.draft_token_ids) for r in large[:3]] == [k, 1, 1]


@pytest.mark.parametrize("method", ["eagle3", "mtp", "draft_model"])
def test_fill_kv_writes_the_kv_of_the_full_pass(method):
    """A drafter's pass whose outputs nobody reads writes only the draft's KV (`fill_kv`): the same
    KV as the full forward, for each model proposer's network."""
    from lanner.layers.attention import forward_context
    from lanner.layers.attention.torch_backend import TorchAttentionBackend

    spec = llm(speculative_config={"method": method, "num_speculative_tokens": 2})
    drafter = spec.engine.runner.drafter
    net, shape = drafter.net, drafter.kv_caches[0][0].shape
    T = 7
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.engine.vocab_size, (T,), generator=generator)
    positions = torch.arange(3, 3 + T)
    hidden = None
    if drafter.proposer.target_hidden == "aux":
        hidden = torch.randn(T, drafter.aux_hidden.shape[1], generator=generator)
    elif drafter.proposer.target_hidden == "final":
        hidden = torch.randn(T, spec.engine.runner.model.spec.hidden_size, generator=generator)
    caches = []
    for fill in (False, True):
        kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in drafter.kv_caches]
        backend = TorchAttentionBackend(kv, shape[1])
        backend.plan(ForwardBatch(ids, positions, positions, [T], [3 + T], [list(range(shape[0]))], positions[:0], T))
        with forward_context(backend):
            (net.fill_kv if fill else net)(ids, positions, hidden)
        caches.append(kv)
    assert all(k.abs().sum() > 0 for k, _ in caches[0][:drafter.net.spec.num_layers if method == "draft_model" else 1])
    for (k, v), (k_fill, v_fill) in zip(*caches):
        torch.testing.assert_close(k_fill, k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v_fill, v, rtol=1e-5, atol=1e-6)


def test_a_drafter_with_nobody_drafting_next_only_fills_its_kv(monkeypatch):
    """A model proposer's drafter, in a step where no sampling request will draft next (all
    paused), only writes the draft's KV (`fill_kv`, the draft's KV follows the target); before a
    step where the only drafting requests probe, it runs the first pass without the k-1 steps."""
    from lanner.bench.speculative import replay_drafts
    from lanner.engine.speculation import Speculator
    from lanner.executor.drafter import Drafter

    monkeypatch.setattr(Speculator, "PAUSE_FROM_BATCH", 1)
    plain = llm()
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    outs = plain.generate(CODE[:1], params, use_tqdm=False)
    want = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in outs}
    spec = llm(speculative_config={"method": "eagle3", "num_speculative_tokens": 3})
    calls = {"first": 0, "fill": 0, "steps": 0}

    def counting(name, function):
        return lambda *a: (calls.__setitem__(name, calls[name] + 1), function(*a))[1]

    monkeypatch.setattr(Drafter, "propose", counting("first", Drafter.propose))
    monkeypatch.setattr(Drafter, "_decode_steps", counting("steps", Drafter._decode_steps))
    net = spec.engine.runner.drafter.net
    monkeypatch.setattr(net, "fill_kv", counting("fill", net.fill_kv))
    # every draft wrong, on the device (drafts of steps planned before the last is read back come from there)
    replay_drafts(spec, want, {key: [False] * len(cont) for key, cont in want.items()})
    got = spec.generate(CODE[:1], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    stats = spec.engine.speculator.stats
    # probes of one draft (a large batch, here from PAUSE_FROM_BATCH = 1), after pauses from the second miss
    assert stats.accepted == 0 and stats.verifications == stats.drafts == 7
    assert calls["first"] == spec.engine.num_steps  # every step writes the draft's KV
    assert calls["steps"] == 1  # only after the prompt's step (its policy is decided when it decodes)
    assert 40 < calls["fill"] < calls["first"]  # every step before a paused one


def eager_capture_ladder(self, setup, run, what, backend=None, sizes=None, pool=None):
    """SizeLadder.capture_ladder without CUDA: a "graph" whose replay re-runs `run(size)` and
    writes the results into the tensors the capture returned, as a real replay does. Graph
    runners then stage, plan and read through their static buffers exactly as on the GPU. What a
    real graph fixes at capture (the Triton backend's kernel choice; for the decode kernel the
    planned rows and split count, for the prefill kernel its grid) is kept
    and checked at each replay: the same. (Every planned batch fits that table, or the plan raises.)"""
    backend = self.runner.backend if hasattr(self, "runner") else self.drafter.backend

    def baked():
        if not hasattr(backend, "decode_only"):  # the torch backend: nothing is fixed
            return {}
        if backend.decode_only:
            return {"decode_only": True, "rows": backend.rows, "num_splits": backend.num_splits}
        return {"decode_only": False, "programs": backend.num_prefill_programs, "tile": backend.prefill_tile}

    class Replayed:
        def __init__(self, size, out, at_capture):
            self.size, self.out, self.at_capture = size, out, at_capture

        def replay(self):
            now, then = baked(), self.at_capture
            assert now == then, (what, self.size, now, then)
            new = run(self.size)
            for dst, src in zip(*(o if isinstance(o, tuple) else (o,) for o in (self.out, new))):
                if dst is not None:
                    dst.copy_(src)

    graphs = {}
    for size in reversed(self.sizes if sizes is None else sizes):
        setup(size)
        at_capture = baked()
        out = run(size)
        graphs[size] = (Replayed(size, out, at_capture), out)
    return graphs, None


@pytest.mark.parametrize("method", ["eagle3", "mtp", "draft_model"])
def test_graph_plumbing_of_verify_and_draft_steps_replayed_eagerly(want, method, monkeypatch):
    """The target's decode graphs over verify rows, the draft's first-pass graphs and its decode
    graphs, with every replay re-run eagerly on the CPU (eager_capture_ladder): padding, static
    buffers and the hand-offs between them give the outputs of decoding without speculation."""
    spec = llm(speculative_config={"method": method, "num_speculative_tokens": 3}, max_num_seqs=4,
               max_num_batched_tokens=24)  # prompt chunks (+1 row per request for a draft LM) within 32
    with_eager_graphs(spec, monkeypatch)
    got = [o.outputs[0].token_ids for o in spec.generate(CODE, GREEDY, use_tqdm=False)]
    assert got == want
    assert_all_graphs_replayed(spec)


def with_eager_graphs(spec, monkeypatch):
    """Capture the runner's decode graphs and the drafter's graphs as the GPU path does
    (ModelRunner.capture_graphs, with the piecewise ladder a GPU would have), with
    eager_capture_ladder."""
    from lanner.executor.graphs import SizeLadder
    from lanner.executor.piecewise import piecewise_sizes

    monkeypatch.setattr(SizeLadder, "capture_ladder", eager_capture_ladder)
    runner = spec.engine.runner
    runner.capture_graphs(piecewise_sizes(runner.config.scheduler.max_num_batched_tokens))
    return runner


def assert_all_graphs_replayed(spec) -> None:
    runner = spec.engine.runner
    assert runner.num_verify_graph_steps > 0 and spec.engine.speculator.stats.accepted > 0
    drafter = runner.drafter
    assert all(sum(g.replays.values()) > 0 for g in (drafter.first_pass_graphs, drafter.prefill_graphs, drafter.graphs))
    assert set(runner.graphs.replays) - set(decode_graph_sizes_of(runner))  # verify row counts that are no batch size


def decode_graph_sizes_of(runner) -> list[int]:
    from lanner.executor.graphs import decode_graph_sizes

    return decode_graph_sizes(runner.config.scheduler.max_num_seqs)


def test_padded_graph_metadata_through_the_triton_kernels(qwen3_path, monkeypatch):
    """The same replayed eagerly through the GPU backend and its Triton kernels (the interpreter):
    padded verify rows in the decode kernel, padded prefill plans (empty sequences after the real
    ones, the cumulative tail repeated) in the draft's prefill graphs. The draft is the target
    itself, so the greedy tokens must equal transformers' and almost every draft is accepted."""
    from conftest import hf_greedy, hf_model, make_llm, random_prompts

    hf = hf_model(qwen3_path)
    prompts = random_prompts(2, 5, 30, hf.config.vocab_size, seed=8)
    spec = make_llm(qwen3_path, attention_backend="triton", block_size=4, max_num_seqs=4, max_num_batched_tokens=24,
                    speculative_config={"method": "draft_model", "model": qwen3_path, "num_speculative_tokens": 2})
    with_eager_graphs(spec, monkeypatch)
    outs = spec.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=6),
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, 6)
    assert_all_graphs_replayed(spec)
    stats = spec.engine.speculator.stats
    assert stats.accepted >= 0.9 * stats.drafts


def test_a_prompt_step_with_more_requests_than_the_graph_ladder(qwen3_path, monkeypatch):
    """With cuda_graph_sizes smaller than max_num_seqs, a prompt step of more requests than the
    ladder's largest size still fits the draft's prefill graphs (they hold max_num_seqs
    sequences): once planned for the ladder's size it overfilled the plan and failed the step."""
    from conftest import hf_greedy, hf_model, make_llm, random_prompts

    hf = hf_model(qwen3_path)
    prompts = random_prompts(3, 3, 6, hf.config.vocab_size, seed=2)
    spec = make_llm(qwen3_path, attention_backend="triton", max_num_seqs=4, max_num_batched_tokens=24,
                    cuda_graph_sizes=[1, 2],
                    speculative_config={"method": "draft_model", "model": qwen3_path, "num_speculative_tokens": 2})
    runner = with_eager_graphs(spec, monkeypatch)
    outs = spec.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=4),
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, 4)
    assert sum(runner.drafter.prefill_graphs.replays.values()) > 0


def split_count_of_its_own_at_5_rows(monkeypatch):
    """The decode kernel's split rule patched so 5 rows, a size no graph ladder here has, alone
    plan 2 splits (every other row count 1): a kernel shape only a warm-up at 5 rows compiles."""
    from lanner.layers.attention import triton_backend

    monkeypatch.setattr(triton_backend, "num_decode_splits", lambda rows, *_: 1 + (rows == 5))


def kv_of(owner) -> list[torch.Tensor]:
    """A copy of the K and V caches of `owner` (a drafter or a runner)."""
    return [t.clone() for pair in owner.kv_caches for t in pair]


def test_draft_eager_prompt_chunks_and_decode_rows_warm_up_at_start(qwen3_path, monkeypatch):
    """A draft LM's prompt chunks over its prefill graphs run the first pass eagerly, with prefill
    tiles no capture compiled, and decode rows run eagerly too (the k-1 steps after such a pass,
    over the step's sampling requests; a first pass of more rows than its graphs), with a split
    count that follows their number: at start one eager pass runs for each new kernel shape (here
    one prefill tile: every size over the graphs plans the same one; and the split count of 5 rows,
    a size no graph has), writing no KV."""
    from conftest import make_llm

    import lanner.executor.drafter as drafter_module

    monkeypatch.setattr(drafter_module, "DRAFT_PREFILL_GRAPH_MAX_TOKENS", 16)
    split_count_of_its_own_at_5_rows(monkeypatch)
    spec = make_llm(qwen3_path, attention_backend="triton", max_num_seqs=6, max_num_batched_tokens=64,
                    speculative_config={"method": "draft_model", "model": qwen3_path, "num_speculative_tokens": 2})
    drafter = spec.engine.runner.drafter
    calls, shapes = [], set()
    forward = drafter.net.forward

    def recording(ids, *args, **kwargs):
        calls.append(ids.shape[0])
        shapes.add(drafter.backend.kernel_shape())
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(drafter.net, "forward", recording)
    kv_before = kv_of(drafter)
    with_eager_graphs(spec, monkeypatch)
    assert drafter.prefill_graphs.max_size == 16
    assert [n for n in calls if n > 16 and n not in drafter.first_pass_graphs.sizes] == [32]
    assert 5 not in drafter.graphs.sizes + drafter.first_pass_graphs.sizes
    assert ("decode", 2) in shapes
    assert all(torch.equal(a, b) for a, b in zip(kv_before, kv_of(drafter)))


@pytest.mark.parametrize("method", ["eagle3", "mtp"])
def test_a_heads_eager_decode_rows_warm_up_with_its_carried_state(method, monkeypatch):
    """EAGLE-3 and MTP heads read their own last hidden state in decode steps: the warm-up feeds one
    of the head's width, one pass at the first row count of each split count, and writes no KV."""
    split_count_of_its_own_at_5_rows(monkeypatch)
    spec = llm(speculative_config={"method": method, "num_speculative_tokens": 2}, max_num_seqs=2,
               attention_backend="triton")
    drafter = spec.engine.runner.drafter
    passes = []
    forward = drafter.net.forward
    monkeypatch.setattr(drafter.net, "forward", lambda ids, positions, carry: (
        passes.append((ids.shape[0], tuple(carry.shape), drafter.backend.kernel_shape())),
        forward(ids, positions, carry))[1])
    kv_before = kv_of(drafter)
    drafter._warm_up_eager_decode_rows()
    hidden = drafter.net.spec.hidden_size
    assert drafter.max_rows >= 5 and passes == [(1, (1, hidden), ("decode", 1)), (5, (5, hidden), ("decode", 2))]
    assert all(torch.equal(a, b) for a, b in zip(kv_before, kv_of(drafter)))


def test_decode_steps_over_the_largest_decode_graph_warm_up_at_start(qwen3_path, monkeypatch):
    """Decode-only steps of more rows than the largest decode graph (here cuda_graph_sizes [1, 2] with
    6 requests) run outside the graphs, with a split count that follows their row count: at start one
    such step runs for each split count no graph compiled (5 rows alone plan one here), writing no KV,
    and none for a count the graphs have."""
    from conftest import make_llm

    split_count_of_its_own_at_5_rows(monkeypatch)
    spec = make_llm(qwen3_path, attention_backend="triton", max_num_seqs=6, max_num_batched_tokens=24,
                    cuda_graph_sizes=[1, 2])
    runner = spec.engine.runner
    planned = []
    run_model = runner.run_model

    def recording(batch):
        out = run_model(batch)
        planned.append((batch.num_seqs, runner.backend.kernel_shape()))
        return out

    monkeypatch.setattr(runner, "run_model", recording)
    kv_before = kv_of(runner)
    with_eager_graphs(spec, monkeypatch)
    assert max(runner.graphs.sizes) == 2 and runner.max_decode_rows == 6
    assert [rows for rows, _ in planned] == [5] and planned[0][1] == ("decode", 2)
    assert all(torch.equal(a, b) for a, b in zip(kv_before, kv_of(runner)))
