"""Host-to-device staging (core/transfer.py) on the CPU: the pinned ring's turns and growth, and
`to_device` through it. The event guard itself needs a GPU: tests/gpu/test_engine_gpu.py runs
overlapped steps through it."""
from __future__ import annotations

import numpy as np
import torch

from lanner.core.transfer import Pieces, PinnedRing, to_device, to_device_parts


def test_a_pinned_ring_hands_out_its_buffers_in_turn_and_grows():
    ring = PinnedRing(torch.device("cpu"), depth=2)
    a, a_view = ring.take(4, torch.long)
    a_view[:] = range(4)  # the tensor and its numpy view share memory
    b, _ = ring.take((3, 2), torch.int32)
    assert a.data_ptr() != b.data_ptr() and a.tolist() == [0, 1, 2, 3] and b.shape == (3, 2)
    big, big_view = ring.take(10_000, torch.long)  # the first buffer again, grown to hold it
    assert big.numel() == 10_000 and big.dtype == torch.long and big_view.shape == (10_000,)
    again, _ = ring.take((3, 2), torch.int32)  # the second buffer's view of that shape, kept
    assert again is b
    assert ring.take(10_000, torch.long)[0] is big  # the first buffer's, kept while the buffer is
    values = [[1, 2], [3, 4], [5, 6]]
    assert to_device(values, torch.long, torch.device("cpu"), ring).tolist() == values
    first = to_device([7, 8], torch.long, torch.device("cpu"), ring)
    to_device([9, 9], torch.long, torch.device("cpu"), ring)
    to_device([9, 9], torch.long, torch.device("cpu"), ring)
    assert first.tolist() == [7, 8]  # on the CPU the result is a copy: the ring's buffer is reused


def test_a_ring_hands_out_parts_of_one_buffer_and_keeps_their_views():
    ring = PinnedRing(torch.device("cpu"), depth=1)
    (tables, tables_view), (lens, lens_view) = ring.take_parts(((2, 3), (5,)), torch.int32)
    assert tables.shape == (2, 3) and lens.shape == (5,) and tables_view.shape == (2, 3)
    assert lens.data_ptr() == tables.data_ptr() + 6 * 4  # one after the other
    tables_view[:] = 7
    lens_view[:] = range(5)
    assert tables.tolist() == [[7] * 3] * 2 and lens.tolist() == list(range(5))
    again = ring.take_parts(((2, 3), (5,)), torch.int32)
    assert again[0][0] is tables and again[1][0] is lens  # the same shapes: the views made before
    grown, _ = ring.take(100_000, torch.int32)  # a larger take grows the buffer: the old views go
    assert ring.take_parts(((2, 3), (5,)), torch.int32)[0][0].data_ptr() == grown.data_ptr()


def test_parts_sent_in_one_copy_each_start_16_byte_aligned():
    """Triton specializes a kernel on whether each pointer is 16-byte aligned: a drafter's slots at an
    odd offset of the copy compiled new variants of the KV store and attention kernels mid-run."""
    ring = PinnedRing(torch.device("cpu"))
    parts = [[1, 2, 3], Pieces(([4], np.arange(5, 8), [8])), [], [9], range(10, 15)]
    views = to_device_parts(parts, torch.long, ring)
    assert [v.tolist() for v in views] == [[1, 2, 3], [4, 5, 6, 7, 8], [], [9], list(range(10, 15))]
    assert all(v.data_ptr() % 16 == 0 for v in views)
    halves = to_device_parts([[1], [2, 3, 4], [5]], torch.int32, ring)
    assert [v.tolist() for v in halves] == [[1], [2, 3, 4], [5]] and all(v.data_ptr() % 16 == 0 for v in halves)


def _check_staging(runner, seen: list) -> None:
    """Wrap runner.prepare: every step's staged input ids, positions and slots must be each scheduled
    token's, in the order the step lists them; `seen` gets (query lengths, those of the chunks that
    end past their prompt)."""
    from lanner.core.batch import kv_slots

    prepare = runner.prepare

    def checked(sched):
        spans = [(req, req.num_computed_tokens, req.num_computed_tokens + n) for req, n in sched.scheduled]
        out = prepare(sched)
        batch, n = out[0], out[0].num_real_tokens
        assert batch.input_ids[:n].tolist() == [t for req, a, b in spans for t in req.all_token_ids[a:b]]
        assert batch.positions[:n].tolist() == [p for _, a, b in spans for p in range(a, b)]
        assert batch.slot_mapping[:n].tolist() == [s for req, a, b in spans
                                                   for s in kv_slots(req.block_ids, a, b, runner.block_size)]
        seen.append(([b - a for _, a, b in spans], [b - a for req, a, b in spans if b > req.num_prompt_tokens]))
        return out

    runner.prepare = checked


def test_a_mixed_step_stages_each_token_at_its_position_and_slot(qwen3_path):
    """A step mixing decode rows, prompt chunks long enough to be staged as arrays (LONG_CHUNK) and a
    short chunk after them stages each token's id, position, and its block's slot at its offset, in
    the order the step lists them."""
    from conftest import make_llm

    from lanner.core.batch import LONG_CHUNK
    from lanner.core.request import SamplingParams

    llm = make_llm(qwen3_path, block_size=4, max_num_batched_tokens=160, overlap_scheduling=False)
    engine, seen = llm.engine, []
    _check_staging(engine.runner, seen)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(2):  # distinct prompts throughout: no prefix-cache hits shorten the chunks
        engine.add_request(f"short{i}", list(range(5 + 10 * i, 15 + 10 * i)), params)
    engine.step()
    engine.add_request("long", list(range(3, 153)), params)
    engine.add_request("next", list(range(200, 300)), params)
    while engine.has_unfinished_requests():
        engine.step()
    lens = [n for n, _ in seen]
    assert [1, 1, 150, 8] in lens and [1, 1, 1, 92] in lens and 92 >= LONG_CHUNK


def test_a_recomputed_long_chunk_stages_its_outputs_after_its_prompt(qwen3_path):
    """A preempted request recomputes its prompt and its outputs in one long chunk: the ids past the
    prompt come from its outputs (the prompt's array holds only the prompt)."""
    from conftest import make_llm

    from lanner.core.batch import LONG_CHUNK
    from lanner.core.request import SamplingParams

    llm = make_llm(qwen3_path, block_size=4, num_kv_blocks=39, max_num_batched_tokens=256,
                   overlap_scheduling=False, enable_prefix_caching=False)  # the recompute computes it all
    engine, seen = llm.engine, []
    _check_staging(engine.runner, seen)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for i in range(2):  # 18 blocks each at first, 20 at the end: together more than the cache holds
        engine.add_request(f"r{i}", list(range(3 + 100 * i, 73 + 100 * i)), params)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert any(n >= LONG_CHUNK for _, past in seen for n in past)


def test_a_drafter_stages_each_row_at_its_position_and_slot():
    """A draft model's first pass over steps mixing long prompt chunks (staged as arrays) with short
    chunks and decode rows stages each row's position and KV slot: its chunk's, and `shift` more."""
    from lanner import LLM
    from lanner.core.batch import LONG_CHUNK, kv_slots
    from lanner.core.request import SamplingParams
    from lanner.default_model import DRAFT_MODEL

    spec = LLM(device="cpu", dtype="float32", max_num_batched_tokens=200, overlap_scheduling=False,
               speculative_config={"method": "draft_model", "num_speculative_tokens": 3, "model": DRAFT_MODEL})
    drafter, seen = spec.engine.runner.drafter, []
    stage = drafter.stage

    def checked(layout, *args, **kwargs):
        staged = stage(layout, *args, **kwargs)
        spans = [(req, req.num_computed_tokens, req.num_computed_tokens + n + drafter.shift)
                 for req, _, n, _, _ in layout]
        assert staged.positions.tolist() == [p for _, a, b in spans for p in range(a, b)]
        assert staged.slots.tolist() == [s for req, a, b in spans
                                         for s in kv_slots(req.block_ids, a, b, drafter.block_size)]
        seen.append([n for _, _, n, _, _ in layout])
        return staged

    drafter.stage = checked
    prompts = [{"prompt_token_ids": [(7 * i + 3 * n) % 8000 + 3 for i in range(n)]} for n in (10, 70, 150, 90)]
    spec.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert drafter.shift == 1
    assert any(any(n >= LONG_CHUNK for n in lens) and any(n < LONG_CHUNK for n in lens) for lens in seen)
