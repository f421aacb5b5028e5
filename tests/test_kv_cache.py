"""Block allocator, prefix cache and scheduler invariants, without a model:
random sequences of arrivals, steps, finishes and aborts never leak a block."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.config import SchedulerConfig
from lanner.core.batch import kv_slot_array, kv_slots
from lanner.core.request import Request, SamplingParams
from lanner.engine.kv_cache import KVCacheManager
from lanner.engine.scheduler import Scheduler


def make_request(i: int, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(f"r{i}", None, tokens, SamplingParams(max_tokens=max_tokens), set())


def test_allocate_free_and_prefix_hit():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request(0, list(range(10)))
    assert kv.allocate(a, 10, kv.find_cached_blocks(a))
    assert len(a.block_ids) == 3 and kv.stats().used_blocks == 3
    b = make_request(1, list(range(9)) + [99])
    cached = kv.find_cached_blocks(b)
    assert cached == a.block_ids[:2]  # two full blocks shared, the third differs
    assert kv.allocate(b, 2, cached) and b.num_computed_tokens == 8
    assert kv.stats().used_blocks == 4  # 3 of a + 1 fresh of b
    kv.free_request(a)
    kv.free_request(b)
    s = kv.stats()
    assert s.used_blocks == 0 and s.cached_blocks == 2 and s.free_blocks == 8
    kv.check_invariants([])


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a = make_request(0, list(range(12)))
    assert not kv.allocate(a, 12, [])
    assert a.block_ids == [] and kv.stats().free_blocks == 2 and kv.prefix_queries == 0


def test_eviction_takes_least_recently_freed_and_drops_its_hash():
    kv = KVCacheManager(num_blocks=2, block_size=2)
    a = make_request(0, [1, 2, 3])
    assert kv.allocate(a, 3, kv.find_cached_blocks(a))
    kv.free_request(a)  # block 0 holds [1, 2] and stays cached
    b = make_request(1, [7, 8, 9, 10, 11])
    assert not kv.allocate(b, 5, kv.find_cached_blocks(b))  # 3 blocks > 2
    c = make_request(2, [5, 6, 7])
    assert kv.allocate(c, 3, kv.find_cached_blocks(c))  # evicts both free blocks
    assert kv.find_cached_blocks(make_request(3, [1, 2, 3])) == []
    kv.check_invariants([c])


def test_tail_blocks_are_evicted_before_prefix():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request(0, [1, 2, 3, 4, 5])
    assert kv.allocate(a, 5, [])
    prefix_block = a.block_ids[0]
    kv.free_request(a)
    d = make_request(1, [9, 9, 9])
    assert kv.allocate(d, 3, [])  # two blocks: the never-used one, then a's tail
    assert prefix_block not in d.block_ids
    assert kv.find_cached_blocks(make_request(2, [1, 2, 3])) == [prefix_block]


def run_random_workload(ops: list[tuple[int, int, int]], num_blocks: int, block_size: int, budget: int,
                        max_seqs: int, trace: list | None = None) -> tuple[int, int]:
    """Returns (preemptions, requests still unfinished at the end); `trace` gets the block tables
    and the prefix cache after each operation."""
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv)
    live: dict[str, Request] = {}
    rng = torch.Generator().manual_seed(0)
    for i, (kind, length, shared) in enumerate(ops):
        if kind == 0 and len(live) < 12:  # arrive (prompts share a prefix of variable length)
            tokens = [7] * shared + torch.randint(0, 50, (length,), generator=rng).tolist()
            if kv.blocks_needed(len(tokens) + 8) <= num_blocks:
                live[f"r{i}"] = req = make_request(i, tokens)
                sched.add(req)
        elif kind == 1 and live:  # abort one
            req = live.pop(sorted(live)[length % len(live)])
            sched.finish(req)
        else:  # one step: computed tokens advance; requests at their end sample a token
            out = sched.schedule()
            for req, n in out.scheduled:
                assert n > 0 and req.num_computed_tokens + n <= req.num_tokens
                req.num_computed_tokens += n
                if req.num_computed_tokens == req.num_tokens:
                    req.append_token(int(torch.randint(0, 50, (1,), generator=rng)))
                    if len(req.output_token_ids) >= req.params.max_tokens:
                        live.pop(req.request_id)
                        sched.finish(req)
            assert out.num_tokens <= budget and len(sched.running) <= max_seqs
        kv.check_invariants(list(sched.running))
        if trace is not None:
            trace.append(([(r.request_id, list(r.block_ids)) for r in sched.running], dict(kv.cached)))
    unfinished = len(live)
    for req in list(live.values()):
        sched.finish(req)
    kv.check_invariants([])
    assert kv.stats().used_blocks == 0
    return sched.num_preemptions, unfinished


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(0, 20)), max_size=80),
       num_blocks=st.integers(6, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 8))
def test_random_workloads_never_leak(ops, num_blocks, block_size, budget, max_seqs):
    run_random_workload(ops, num_blocks, block_size, budget, max_seqs)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(0, 20)), max_size=80),
       num_blocks=st.integers(6, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 8))
def test_the_running_requests_shortcut_allocates_as_the_general_path(ops, num_blocks, block_size, budget, max_seqs):
    fast, general = [], []
    run_random_workload(ops, num_blocks, block_size, budget, max_seqs, fast)
    original = KVCacheManager._nothing_to_do
    KVCacheManager._nothing_to_do = lambda *args: False
    try:
        run_random_workload(ops, num_blocks, block_size, budget, max_seqs, general)
    finally:
        KVCacheManager._nothing_to_do = original
    assert fast == general


def test_decode_steps_take_the_shortcut_until_a_block_fills():
    kv = KVCacheManager(8, 4)
    req = make_request(0, [1, 2, 3, 4, 5])
    assert kv.allocate(req, 5, [])
    req.num_computed_tokens = 5
    for token in (6, 7, 8):  # positions 5..7 fit the second block; the 8th token fills it
        req.append_token(token)
        assert kv._nothing_to_do(req, req.num_computed_tokens + 1, 0) is (token != 8)
        assert kv.allocate(req, 1)
        req.num_computed_tokens += 1
    assert len(kv.cached) == 2 and kv._nothing_to_do(req, 8, 0) and not kv._nothing_to_do(req, 9, 0)


def test_waiting_requests_finish_under_pressure():
    """Many requests through a tiny cache: everything finishes, nothing leaks, preemption happened."""
    ops = [(0, 20, 5)] * 10 + [(2, 0, 0)] * 400
    preemptions, unfinished = run_random_workload(ops, 12, 4, 32, 8)
    assert preemptions > 0 and unfinished == 0


@settings(max_examples=300, deadline=None)
@given(block_size=st.sampled_from([1, 2, 16]), blocks=st.lists(st.integers(0, 999), max_size=8, unique=True),
       start=st.integers(0, 150), length=st.integers(0, 150))
def test_kv_slots_are_each_positions_block_and_offset(block_size, blocks, start, length):
    """The per-block fast path and the numpy one give, for every position, its block's slot at its
    offset, and -1 past the allocated blocks (a decode row's single position too)."""
    expected = [blocks[p // block_size] * block_size + p % block_size if p // block_size < len(blocks) else -1
                for p in range(start, start + length)]
    assert kv_slots(blocks, start, start + length, block_size) == expected
    assert kv_slot_array(blocks, start, start + length, block_size).tolist() == expected  # prompt chunks' form



def test_prompt_blocks_are_hashed_on_arrival_unless_every_position_is_computed():
    """The scheduler hashes a prompt's full blocks (all but the last token's) when the request
    arrives, so the step that admits it does not; a request whose every prompt position is
    computed anyway (prompt logprobs) never looks the cache up, and is not hashed."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), KVCacheManager(16, 4))
    plain = make_request(0, list(range(13)))
    scored = Request("r1", None, list(range(13)), SamplingParams(max_tokens=4, prompt_logprobs=1), set())
    sched.add(plain)
    sched.add(scored)
    assert len(plain.block_hashes) == 3 and scored.block_hashes == []
    sched.schedule()
    assert len(plain.block_hashes) == 3  # nothing hashed twice
