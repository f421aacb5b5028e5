"""The split forward behind piecewise CUDA graphs, on the CPU: capture sizes, piece
boundaries, padding (no KV writes, zero attention rows, no effect on real tokens),
the oversized-step fallback, and end-to-end outputs through the engine."""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch
from conftest import make_llm

from lanner import SamplingParams
from lanner.executor.piecewise import PiecewiseGraphs, piecewise_sizes
from lanner.layers.attention import forward_context


def test_capture_size_ladder():
    sizes = piecewise_sizes(8192)
    assert sizes[0] == 16 and sizes[-1] == 8192 and sizes == sorted(set(sizes))
    assert all(b - a <= max(16, a // 8) for a, b in zip(sizes, sizes[1:]))  # padding waste stays small
    assert {512, 1024, 2048, 4096} <= set(sizes)  # round budgets need no padding
    assert piecewise_sizes(100) == [16, 32, 48, 64, 80, 96, 100]  # capped by the token budget
    assert piecewise_sizes(512, [1000, 64, 8, 64]) == [8, 64]


def _staged_batch(runner, num_tokens: int):
    """Two sequences (a 5-token prefill and a 2-token chunk after 3 cached tokens), staged as the
    runner stages steps: padded to the next piecewise size."""
    bs = runner.block_size
    tables = [[0, 1], [2, 3]]
    ids = [3, 4, 5, 6, 7] + [8, 9]
    positions = [0, 1, 2, 3, 4] + [3, 4]
    slots = [tables[0][p // bs] * bs + p % bs for p in positions[:5]] + \
            [tables[1][p // bs] * bs + p % bs for p in positions[5:]]
    assert len(ids) == num_tokens
    return runner._stage([ids], [positions], [slots], [5, 2], [5, 5], tables, [4, 6])


def _unpadded(batch):
    n = batch.num_real_tokens
    return dataclasses.replace(batch, input_ids=batch.input_ids[:n], positions=batch.positions[:n],
                               slot_mapping=batch.slot_mapping[:n])


def test_split_forward_matches_the_plain_forward_and_ignores_padding(qwen3_path):
    llm = make_llm(qwen3_path, piecewise_graphs=True, piecewise_sizes=[16], block_size=4)
    runner = llm.engine.runner
    model, backend = runner.model, runner.backend
    assert model.num_pieces == model.spec.num_layers + 1
    with torch.inference_mode():
        # the cached prefix of sequence 1 (positions 0..2), written by a plain forward
        prefix = _unpadded(runner._stage([[10, 11, 12]], [[0, 1, 2]], [[8, 9, 10]], [3], [3], [[2]], [2]))
        backend.plan(prefix)
        with forward_context(backend):
            model(prefix.input_ids, prefix.positions)
        batch = _staged_batch(runner, 7)
        assert batch.input_ids.shape[0] == 16 and batch.num_real_tokens == 7
        assert torch.equal(batch.slot_mapping[7:], torch.full((9,), -1))
        caches_before = [k.clone() for k, _ in runner.kv_caches]
        split = runner.piecewise.forward(batch, backend)[:7].clone()
        attn_pad = runner.piecewise.bufs.attn_out[7:16]
        assert torch.equal(attn_pad, torch.zeros_like(attn_pad))
        # padding rows wrote no KV: only the 7 real slots changed
        changed = {int(i) for k0, (k1, _) in zip(caches_before, runner.kv_caches)
                   for i in (k0.flatten(0, 1) != k1.flatten(0, 1)).any(-1).any(-1).nonzero().flatten()}
        assert changed <= {0, 1, 2, 3, 4, 11, 12}
        # garbage in the padding rows changes nothing for the real ones
        runner.input_ids[7:16] = torch.arange(100, 109)
        runner.positions[7:16] = 40
        assert torch.equal(runner.piecewise.forward(batch, backend)[:7], split)
        # and the unsplit, unpadded forward agrees
        plain = _unpadded(batch)
        backend.plan(plain)
        with forward_context(backend):
            want = model(plain.input_ids, plain.positions)
        # to rounding only: BLAS picks its blocking by row count, so 16 rows and 7 rows may round apart
        torch.testing.assert_close(split, want, rtol=1e-5, atol=1e-5)


def _mixed_outputs(llm):
    """Random prompt lengths, a shared prefix (prefix hits), chunked prefill mixed with decodes."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 200, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 200, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 60, (8,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    first = llm.generate(prompts[:2], params, use_tqdm=False)  # fills the prefix cache
    rest = llm.generate(prompts[2:], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in first + rest]


@pytest.mark.parametrize("max_tokens", [48, 512])
def test_engine_outputs_identical_with_piecewise(qwen3_path, max_tokens, caplog):
    """max 48 is below the chunk size (64): those steps take the eager fallback, with one warning."""
    want = _mixed_outputs(make_llm(qwen3_path, max_num_batched_tokens=64))
    llm = make_llm(qwen3_path, max_num_batched_tokens=64 if max_tokens < 64 else 512,
                   piecewise_graphs=True, piecewise_max_tokens=max_tokens)
    with caplog.at_level(logging.WARNING, logger="lanner.executor.piecewise"):
        got = _mixed_outputs(llm)
    assert got == want
    assert llm.engine.kv_cache.stats().prefix_hits > 0
    warnings = [r for r in caplog.records if "over the largest piecewise graph" in r.message]
    assert len(warnings) == (1 if max_tokens < 64 else 0)


def test_target_and_draft_graphs_keep_their_own_buffers(qwen3_path):
    runner = make_llm(qwen3_path).engine.runner
    target = PiecewiseGraphs(runner.model, [16, 32], torch.float32, torch.device("cpu"), role="target")
    draft = PiecewiseGraphs(runner.model, [8], torch.float32, torch.device("cpu"), role="draft")
    assert target.max_size == 32 and draft.max_size == 8
    assert target.bufs.residual.data_ptr() != draft.bufs.residual.data_ptr()
    assert draft.padded_size(5) == 8 and draft.padded_size(9) is None and target.padded_size(17) == 32


def test_decode_and_piecewise_ladders_pad_the_same_way():
    from lanner.executor.graphs import DecodeGraphs, decode_graph_sizes

    decode = DecodeGraphs(None, decode_graph_sizes(256))
    assert [decode.padded_size(n) for n in (1, 3, 9, 65, 256, 257)] == [1, 4, 16, 80, 256, None]
    assert decode.max_size == 256


class _FakeCuda:
    """torch.cuda's graph API on the CPU: a capture runs its body eagerly; `capturing` says
    whether a body runs inside one (where a first Triton compilation could fail on a GPU)."""

    def __init__(self, monkeypatch):
        self.capturing = False
        fake = self

        class Graph:
            def pool(self):
                return "pool"

        @contextlib.contextmanager
        def graph(g, pool=None):
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False

        for name, value in (("CUDAGraph", Graph), ("graph", graph), ("synchronize", lambda *a: None),
                            ("empty_cache", lambda: None), ("memory_allocated", lambda *a: 0),
                            ("memory_reserved", lambda *a: 0)):
            monkeypatch.setattr(torch.cuda, name, value)


def test_capture_ladder_compiles_each_new_kernel_shape_outside_a_capture(monkeypatch):
    """Sizes whose attention kernels compile for a new shape (the backend's kernel_shape) run once
    eagerly before their capture; the others are captured straight away."""
    from lanner.executor.graphs import SizeLadder

    cuda = _FakeCuda(monkeypatch)
    backend = type("Backend", (), {"kernel_shape": lambda self: self.shape})()
    runs = []
    SizeLadder([1, 2, 4, 8]).capture_ladder(lambda size: setattr(backend, "shape", size >= 4),
                                            lambda size: runs.append((size, cuda.capturing)), "rows", backend)
    assert runs == [(8, False), (8, True), (4, True), (2, False), (2, True), (1, True)]


def record_plans_and_forwards(runner, cuda, monkeypatch, shape_changes_above: int):
    """The backend's plans (their graph_tokens) and the model's forwards (tokens, inside a capture or
    not), recorded; the attention kernels' shape is new above `shape_changes_above` graph tokens."""
    backend, planned, runs = runner.backend, [], []
    plan = backend.plan
    monkeypatch.setattr(backend, "plan", lambda batch, **kw: (planned.append(kw.get("graph_tokens")), plan(batch, **kw)))
    monkeypatch.setattr(backend, "kernel_shape", lambda: planned[-1] > shape_changes_above, raising=False)
    forward_pieces = runner.model.forward_pieces
    monkeypatch.setattr(runner.model, "forward_pieces",
                        lambda ids, *a, **kw: (runs.append((ids.shape[0], cuda.capturing)), forward_pieces(ids, *a, **kw))[1])
    return backend, planned, runs


def test_whole_forward_graphs_capture_up_to_their_limit_and_compile_outside_a_capture(qwen3_path, monkeypatch):
    runner = make_llm(qwen3_path, piecewise_graphs=True, piecewise_sizes=[16, 32, 48]).engine.runner
    pw = PiecewiseGraphs(runner.model, [16, 32, 48], torch.float32, torch.device("cpu"), full_max_tokens=32)
    assert pw.full_sizes == [16, 32]
    cuda = _FakeCuda(monkeypatch)
    backend, planned, runs = record_plans_and_forwards(runner, cuda, monkeypatch, shape_changes_above=16)
    pw.capture_full(runner.input_ids, runner.positions, runner.slot_mapping, backend)
    assert planned == [32, 16] and sorted(pw.full_graphs) == [16, 32]
    assert runs == [(32, False), (32, True), (16, False), (16, True)]
    assert torch.equal(runner.slot_mapping[:32], torch.full((32,), -1))  # the warm-ups wrote no KV


def test_steps_that_replay_pieces_run_once_at_start_for_each_new_kernel_shape(qwen3_path, monkeypatch):
    """The sizes without a whole-forward graph run one step at start for each attention kernel shape
    they plan, as such a step runs (piece graphs replayed, attention eagerly between them), outside any
    capture and writing no KV: the first long prompt then compiles nothing while others wait."""
    runner = make_llm(qwen3_path, piecewise_graphs=True, piecewise_sizes=[16, 32, 48, 64]).engine.runner
    pw = PiecewiseGraphs(runner.model, [16, 32, 48, 64], torch.float32, torch.device("cpu"), full_max_tokens=16)
    cuda = _FakeCuda(monkeypatch)
    replayed = []

    class Piece:
        def __init__(self, size: int, j: int):
            self.size, self.j = size, j

        def replay(self):
            replayed.append((self.size, self.j, cuda.capturing))

    pw.graphs = {size: [Piece(size, j) for j in range(runner.model.num_pieces)] for size in pw.sizes}
    backend, planned, runs = record_plans_and_forwards(runner, cuda, monkeypatch, shape_changes_above=32)
    runner.slot_mapping.fill_(7)
    pw.capture_full(runner.input_ids, runner.positions, runner.slot_mapping, backend)
    assert sorted(pw.full_graphs) == [16]
    assert planned == [16, 32, 48, 64]  # 64 plans the shape 48 warmed up
    assert runs == [(16, False), (16, True), (32, False), (48, False)]
    num_pieces = runner.model.num_pieces
    assert replayed == [(size, j, False) for size in (32, 48) for j in range(num_pieces)]
    assert torch.equal(runner.slot_mapping[:64], torch.full((64,), -1))


def test_piece_steps_warm_up_even_when_every_size_has_a_whole_forward_graph(qwen3_path, monkeypatch):
    """Decode-only steps over the decode graphs' rows take the pieces whatever the whole-forward
    graphs cover, so one piece step (the smallest) still runs at start."""
    runner = make_llm(qwen3_path, piecewise_graphs=True, piecewise_sizes=[16, 32]).engine.runner
    pw = PiecewiseGraphs(runner.model, [16, 32], torch.float32, torch.device("cpu"), full_max_tokens=32)
    cuda = _FakeCuda(monkeypatch)
    pw.graphs = {size: [type("Piece", (), {"replay": lambda self: None})()] * runner.model.num_pieces
                 for size in pw.sizes}
    _, planned, runs = record_plans_and_forwards(runner, cuda, monkeypatch, shape_changes_above=16)
    pw.capture_full(runner.input_ids, runner.positions, runner.slot_mapping, runner.backend)
    assert planned == [32, 16, 16] and runs[-1] == (16, False) and len(runs) == 5
