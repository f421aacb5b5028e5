"""Host-to-device staging (core/transfer.py) on the CPU: the pinned ring's turns and growth, and
`to_device` through it. The event guard itself needs a GPU: tests/gpu/test_engine_gpu.py runs
overlapped steps through it."""
from __future__ import annotations

import torch

from lanner.core.transfer import PinnedRing, to_device


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


def test_a_mixed_step_stages_each_token_at_its_position_and_slot(qwen3_path):
    """A step mixing decode rows, prompt chunks long enough to be staged as arrays (LONG_CHUNK) and a
    short chunk after them stages each token's position, and its block's slot at its offset, in
    the order the step lists them."""
    from conftest import make_llm
    from lanner.core.batch import kv_slots
    from lanner.core.request import SamplingParams
    from lanner.executor.model_runner import LONG_CHUNK

    llm = make_llm(qwen3_path, block_size=4, max_num_batched_tokens=160, overlap_scheduling=False)
    engine, runner = llm.engine, llm.engine.runner
    seen, prepare = [], runner.prepare

    def checked(sched):
        want_positions = [p for req, n in sched.scheduled
                          for p in range(req.num_computed_tokens, req.num_computed_tokens + n)]
        want_slots = [s for req, n in sched.scheduled
                      for s in kv_slots(req.block_ids, req.num_computed_tokens, req.num_computed_tokens + n, 4)]
        out = prepare(sched)
        batch = out[0]
        assert batch.positions[:batch.num_real_tokens].tolist() == want_positions
        assert batch.slot_mapping[:batch.num_real_tokens].tolist() == want_slots
        seen.append([n for _, n in sched.scheduled])
        return out

    runner.prepare = checked
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(2):  # distinct prompts throughout: no prefix-cache hits shorten the chunks
        engine.add_request(f"short{i}", list(range(5 + 10 * i, 15 + 10 * i)), params)
    engine.step()
    engine.add_request("long", list(range(3, 153)), params)
    engine.add_request("next", list(range(200, 300)), params)
    while engine.has_unfinished_requests():
        engine.step()
    assert [1, 1, 150, 8] in seen and [1, 1, 1, 92] in seen and 92 >= LONG_CHUNK
