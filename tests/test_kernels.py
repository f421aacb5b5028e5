"""The Triton attention kernels against their torch references on small shapes
(on the CPU through TRITON_INTERPRET=1, which conftest sets when there is no GPU)."""
from __future__ import annotations

import pytest
import torch
from kernel_cases import paged_problem, tile_table

from lanner.core.batch import ForwardBatch
from lanner.kernels.attention.decode import decode_attention, decode_workspace, num_decode_splits
from lanner.kernels.attention.prefill import prefill_attention
from lanner.kernels.attention.reference import (
    decode_attention_ref,
    prefill_attention_ref,
    store_kv_ref,
    to_cache_ref,
)
from lanner.kernels.attention.store_kv import store_kv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_store_kv_skips_padding_slots():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, 16, generator=g)
    v = torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, -1, 17, 0, -1])
    caches = [torch.zeros(4, 8, 2, 16) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].view(-1, 2, 16)[[1, 2, 4]].abs().sum() == 0


@pytest.mark.parametrize("heads,kv_heads,dim,page,seq_lens,splits", [
    (4, 2, 32, 16, [1, 17, 70], 1),
    (4, 1, 16, 8, [5, 33, 90], 3),  # MQA, more splits than some sequences need
    (2, 2, 64, 16, [0, 40], 2),  # a padding row (length 0) must come out zero
])
def test_decode_matches_reference(heads, kv_heads, dim, page, seq_lens, splits):
    """A split per 8 keys: the short sequences here use several splits (5 keys: one)."""
    q, kc, vc, bt, sl, _ = paged_problem(seq_lens, [1] * len(seq_lens), heads, kv_heads, dim, page,
                                         torch.float32, DEV)
    workspace = decode_workspace(len(seq_lens) * splits, heads, dim, len(seq_lens) * kv_heads, DEV)
    ref = decode_attention_ref(q, kc, vc, bt, sl, 0.3)
    for _ in range(2):  # the last split of each (sequence, kv head) merges, and zeroes its counter for the next
        out = decode_attention(q, kc, vc, bt, sl, 0.3, num_splits=splits, workspace=workspace, min_split_keys=8,
                               one_split_keys=8)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
        assert torch.all(out[torch.tensor(seq_lens) == 0] == 0)
        assert not workspace[2].any()


def test_a_short_sequence_uses_fewer_splits_than_the_launch():
    """The launch's split count is an upper bound: each sequence uses one split per MIN_SPLIT_KEYS
    (64) keys, and one up to ONE_SPLIT_KEYS (128), so a batch-1 step of a short sequence writes its
    output directly (no partials, no merge), and a 200-key one merges four partials, not eight. The
    partials start as NaN: those a sequence should not write stay NaN, and the outputs equal the
    reference's."""
    seq_lens, splits, heads = [5, 128, 200], 8, 4
    q, kc, vc, bt, sl, _ = paged_problem(seq_lens, [1] * 3, heads, 2, 16, 16, torch.float32, DEV)
    workspace = decode_workspace(3 * splits, heads, 16, 3 * 2, DEV)
    workspace[0].fill_(float("nan")), workspace[1].fill_(float("nan"))
    out = decode_attention(q, kc, vc, bt, sl, 0.3, num_splits=splits, workspace=workspace)
    torch.testing.assert_close(out, decode_attention_ref(q, kc, vc, bt, sl, 0.3), atol=2e-3, rtol=2e-3)
    written = ~workspace[1].view(3, heads, splits).isnan()
    assert not written[:2].any() and written[2, :, :4].all() and not written[2, :, 4:].any()
    assert not workspace[2].any()


FP8 = torch.float8_e4m3fn


def test_store_kv_into_an_fp8_cache_scales_and_saturates_as_the_reference_does():
    """An fp8 cache holds K / k_scale and V / v_scale in e4m3; values past e4m3's range saturate at
    +-448 (a plain cast gives NaN), as the torch reference (the CPU path) does. Here the values
    divided by their scale are e4m3 numbers, so no rounding is involved: Triton's CPU interpreter
    rounds some values across a power of two wrongly (-7.89 to -4); tests/gpu checks the rounding
    of random values bit for bit."""
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(6, 2, 16, generator=g) * 100).to(FP8).float() * 0.5
    v = (torch.randn(6, 2, 16, generator=g)).to(FP8).float() * 2.0
    k[0, 0, 0], v[2, 1, 3] = 5000.0, -900.0  # past 448 x scale
    slots = torch.tensor([3, -1, 17, 0, 30, 9])
    caches = [torch.zeros(4, 8, 2, 16, dtype=FP8) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots, k_scale=0.5, v_scale=2.0)
    store_kv_ref(k, v, caches[2], caches[3], slots, k_scale=0.5, v_scale=2.0)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    k_flat, v_flat = caches[0].view(-1, 2, 16).float(), caches[1].view(-1, 2, 16).float()
    assert not k_flat.isnan().any() and k_flat[3, 0, 0] == 448.0 and v_flat[17, 1, 3] == -448.0
    kept = slots >= 0
    k[0, 0, 0], v[2, 1, 3] = 224.0, -896.0
    assert torch.equal(k_flat[slots[kept]] * 0.5, k[kept]) and torch.equal(v_flat[slots[kept]] * 2.0, v[kept])
    assert k_flat.view(-1, 32)[[1, 2, 4]].abs().sum() == 0  # no token there


def test_decode_and_prefill_read_an_fp8_cache():
    """Both attention kernels widen the fp8 cache's elements and apply its scales: the same result
    as the reference over the dequantized cache, for a decode batch with splits and a prefill step.
    (float32 queries: the interpreter's bf16 dot is wrong; tests/gpu runs bf16.)"""
    seq_lens, q_lens = [9, 40, 23], [9, 12, 1]
    q, kc, vc, bt, sl, qs = paged_problem(seq_lens, q_lens, 4, 2, 32, 16, torch.float32, DEV)
    k8, v8 = to_cache_ref(kc, FP8, 0.25), to_cache_ref(vc, FP8, 4.0)
    tol = {"atol": 2e-3, "rtol": 2e-3}
    out = prefill_attention(q, k8, v8, bt, sl, qs, tile_table(q_lens, seq_lens, q, kc), 0.25, k_scale=0.25,
                            v_scale=4.0)
    torch.testing.assert_close(out, prefill_attention_ref(q, k8, v8, bt, sl, qs, 0.25, 0.25, 4.0), **tol)
    dq = q[:3]
    workspace = decode_workspace(3 * 2, 4, 32, 3 * 2, DEV)
    out = decode_attention(dq, k8, v8, bt, sl, 0.3, num_splits=2, workspace=workspace, k_scale=0.25, v_scale=4.0)
    torch.testing.assert_close(out, decode_attention_ref(dq, k8, v8, bt, sl, 0.3, 0.25, 4.0), **tol)
    # and not the same as ignoring the scales
    assert (out - decode_attention_ref(dq, k8, v8, bt, sl, 0.3)).abs().max() > 0.1


def test_decode_splits_follow_the_gpus_multiprocessor_count():
    assert num_decode_splits(1, 8, 32768, num_sms=132) == 16  # an H100: capped at 16
    assert num_decode_splits(1, 8, 32768, num_sms=16) == 4  # a small GPU fills with fewer
    assert num_decode_splits(1, 8, 200, num_sms=132) == 4  # no split shorter than 64 keys
    assert num_decode_splits(1, 8, 128, num_sms=132) == 1  # two tiles beat two splits and a merge
    assert num_decode_splits(256, 8, 32768, num_sms=132) == 1  # the batch alone fills the GPU


@pytest.mark.parametrize("heads,kv_heads,dim,page,seq_lens,q_lens", [
    (4, 2, 32, 16, [7, 40, 23], [7, 12, 1]),  # full prefill, prefix + chunk, a decode row
    (2, 1, 16, 8, [65, 3], [65, 3]),  # several query tiles in one sequence
])
def test_prefill_matches_reference(heads, kv_heads, dim, page, seq_lens, q_lens):
    q, kc, vc, bt, sl, qs = paged_problem(seq_lens, q_lens, heads, kv_heads, dim, page, torch.float32, DEV)
    out = prefill_attention(q, kc, vc, bt, sl, qs, tile_table(q_lens, seq_lens, q, kc), 0.25)
    ref = prefill_attention_ref(q, kc, vc, bt, sl, qs, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_prefill_tile_table_puts_the_heaviest_tiles_first_and_the_bound_holds():
    from lanner.kernels.attention.prefill import (
        prefill_programs,
        prefill_tile,
        prefill_tile_bound,
        prefill_tiles,
        tile_positions,
    )

    # tiles of 64 positions, by keys read: 130 new tokens (tiles of 64, 128, 130 keys), a decode row
    # over 300 keys, a 64-token chunk after 10 cached
    tiles = prefill_tiles([130, 1, 64], [130, 300, 74], 64)
    assert tiles[0].tolist() == [5, 0]
    assert tiles[1:].tolist() == [[1, 0], [0, 2], [0, 1], [2, 0], [0, 0]]
    assert prefill_tiles([3], [3], 2, capacity=3).shape == (4, 2)
    # one sequence (its own fast path): the same table as the general order, a chunk after cached keys too
    for q_len, s_len, capacity in ((130, 130, None), (64, 74, 5), (1, 300, None), (0, 7, 2)):
        one = prefill_tiles([q_len], [s_len], 64, capacity)
        assert one.tolist() == prefill_tiles([q_len, 0], [s_len, 0], 64, capacity).tolist()
    with pytest.raises(ValueError):
        prefill_tiles([65, 65], [65, 65], 64, capacity=3)
    # the bound holds for every split of a token count into at most max_seqs sequences
    for lens in ([512], [1] * 256 + [256], [65] * 7 + [57], [64] * 8, [1] * 512):
        assert prefill_tiles(lens, lens, 32)[0, 0] <= prefill_tile_bound(sum(lens), 512, 32)
    # a tile's rows are positions x the GQA group (padded to a power of two)
    assert tile_positions(prefill_tile(128, 4, 512), 4) == 8 and tile_positions(prefill_tile(128, 3, 512), 3) == 8
    assert tile_positions(prefill_tile(128, 4, 4096), 4) == 32
    assert tile_positions(prefill_tile(128, 32, 512), 32) == 1  # wide groups widen the tile
    # a long prompt gets a program per tile; many short queries share programs
    assert prefill_programs(8192, 64, 8, 128, 132) == 64  # a step of one prompt: its tiles
    assert prefill_programs(8192, 64 + 256, 8, 128, 132) == 64 + 66  # a graph of 8192 tokens
    assert prefill_programs(512, 264, 8, 64, 132) == 8 + 66


@pytest.mark.parametrize("heads,kv_heads,programs,tile", [
    (4, 2, 1, None), (4, 2, 3, None), (4, 2, None, None),
    (4, 2, None, (16, 32, 4, 2)),  # 8 positions a tile
    (4, 2, 2, (32, 128, 4, 2)),  # the default tiles of steps of 129-1024 tokens, and over 1024
    (4, 2, None, (128, 128, 8, 2)),
    (6, 2, 2, None),  # a group of 3 heads, padded to 4 rows a position
    (4, 4, None, (16, 16, 4, 2)),  # no GQA
])
def test_prefill_with_fewer_programs_than_tiles_and_unused_rows_matches_the_reference(heads, kv_heads, programs,
                                                                                       tile):
    """A whole-forward CUDA graph captures the kernel with a table of unused rows and fewer
    programs than tiles: each program takes every P-th tile, and the output is the same, for any
    tile shape and GQA group."""
    seq_lens, q_lens = [30, 9, 70], [30, 2, 66]
    q, kc, vc, bt, sl, qs = paged_problem(seq_lens, q_lens, heads, kv_heads, 32, 16, torch.float32, DEV)
    want = prefill_attention_ref(q, kc, vc, bt, sl, qs, 0.25)
    got = prefill_attention(q, kc, vc, bt, sl, qs, tile_table(q_lens, seq_lens, q, kc, capacity=40, tile=tile), 0.25,
                            num_programs=programs, tile=tile)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_fused_rms_norm_matches_reference():
    from lanner.kernels.fused import rms_norm
    from lanner.kernels.fused_reference import rms_norm_ref

    g = torch.Generator().manual_seed(1)
    x, r, w = torch.randn(5, 48, generator=g), torch.randn(5, 48, generator=g), torch.randn(48, generator=g)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    r1 = r.clone()
    out, new_res = rms_norm(x, w, 1e-6, r1)
    want, want_res = rms_norm_ref(x, w, 1e-6, r.clone())
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(r1, want_res)  # the residual is updated in place


@pytest.mark.parametrize("with_norm", [True, False])
def test_fused_norm_rope_matches_reference(with_norm):
    from lanner.kernels.fused import norm_rope
    from lanner.kernels.fused_reference import norm_rope_ref
    from lanner.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(6, 3 * 4 * 16, generator=g)
    q = qkv[:, :64].view(6, 4, 16)  # a strided view, as the fused projection gives
    cos, sin = RotaryEmbedding(16, 10000.0, None).cos_sin(torch.arange(3, 9), torch.float32)
    w = torch.randn(16, generator=g) if with_norm else None
    torch.testing.assert_close(norm_rope(q, cos, sin, w, 1e-6), norm_rope_ref(q, cos, sin, w, 1e-6))


def test_fused_silu_and_mul_matches_reference():
    from lanner.kernels.fused import silu_and_mul
    from lanner.kernels.fused_reference import silu_and_mul_ref

    x = torch.randn(4, 2 * 40, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("vocab", [8, 1000, 2500])
def test_race_sample_matches_reference(vocab):
    """The kernel and the reference draw the same noise from the same keys; tokens
    agree except where two scores tie to float rounding."""
    from lanner.kernels.sampling import race_sample
    from lanner.kernels.sampling_reference import race_noise_ref, race_sample_ref, row_key

    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(3 * torch.randn(16, vocab, generator=g), dim=-1)
    probs[3, 1:] = 0  # a row with one possible token
    probs[3] /= probs[3].sum()
    keys = torch.tensor([row_key(seed, step) for seed, step in zip(range(16), range(100, 116))])
    got = race_sample(probs.to(DEV), keys.to(DEV)).cpu()
    want = race_sample_ref(probs, keys)
    scores = probs / race_noise_ref(keys, vocab)
    chosen = scores.gather(1, got[:, None])[:, 0]
    torch.testing.assert_close(chosen, scores.max(dim=1).values, rtol=1e-5, atol=0)
    assert (got == want).float().mean() >= 0.9 and got[3] == 0


# one split, exactly one, three (CHUNK 4096); the default search (32 pivots, 6 passes, blocks
# skipped), without the skip, and the other shapes scripts/top_p_probe.py times
@pytest.mark.parametrize("vocab,shape", [(1000, {}), (4096, {}), (9000, {}), (9000, {"skip": False}),
                                         (9000, {"pivots": 8, "passes": 10}), (9000, {"pivots": 16, "passes": 8})])
def test_top_p_threshold_matches_reference(vocab, shape):
    """The bisection over bit patterns lands on the sorted cumulative sum's threshold: random rows,
    bf16 ties, a uniform row (every token tied), a row with one possible token, top_p near 0 and 1."""
    from functools import partial

    from lanner.kernels.top_p import top_p_threshold as search
    from lanner.kernels.top_p_reference import top_p_threshold_ref

    top_p_threshold = partial(search, **shape)

    g = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(7, vocab, generator=g)
    logits[1] = logits[1].to(torch.bfloat16).float()
    logits[2] = 0.0
    logits[3] = float("-inf")
    logits[3, 5] = 0.0
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.3, 0.95, 1e-6, 0.999, 0.62])
    got = top_p_threshold(probs.to(DEV), top_p.to(DEV)).cpu()
    assert torch.equal(got, top_p_threshold_ref(probs, top_p))
    assert got[2] == probs[2, 0] and got[3] == 1.0 and got[4] == probs[4].max()
    # the mass reaching top_p exactly keeps the token that reaches it; a row whose float32 sum stays
    # under top_p keeps all; a top_p of 0 (a tiny one rounded in float32) keeps the most likely token
    edge = torch.zeros(3, vocab)
    edge[0, :3] = torch.tensor([0.5, 0.3, 0.2])
    edge[1] = 0.5 / vocab
    edge[2] = probs[0]
    edge_p = torch.tensor([0.8, 0.9, 0.0])
    kept = edge >= top_p_threshold(edge.to(DEV), edge_p.to(DEV)).cpu()[:, None]
    assert torch.equal(kept, edge >= top_p_threshold_ref(edge, edge_p)[:, None])
    assert kept[0].sum() == 2 and kept[1].all() and kept[2].sum() == 1
    kept = probs >= got[:, None]
    mass = (probs * kept).sum(dim=-1)
    above = (probs * (probs > got[:, None])).sum(dim=-1)
    assert (mass >= top_p - 1e-6).all() and (above < top_p).all()  # it reaches top_p; less would not


def test_top_p_search_shapes_that_cannot_finish_are_refused():
    from lanner.kernels.top_p import top_p_threshold

    probs, top_p = torch.full((1, 8), 1 / 8), torch.tensor([0.5])
    for shape, why in (({"pivots": 8, "passes": 9}, "do not narrow"), ({"pivots": 12, "passes": 10}, "power of 2"),
                       ({"pivots": 1, "passes": 40}, "power of 2"), ({"pivots": 128, "passes": 5}, "power of 2")):
        with pytest.raises(ValueError, match=why):
            top_p_threshold(probs, top_p, **shape)


def test_race_noise_is_exponential_and_keyed():
    from lanner.kernels.sampling_reference import race_noise_ref, row_key

    noise = race_noise_ref(torch.tensor([row_key(1, i) for i in range(64)]), 4096)
    assert abs(noise.mean().item() - 1) < 0.01 and abs(noise.std().item() - 1) < 0.01
    again = race_noise_ref(torch.tensor([row_key(1, 5), row_key(2, 5)]), 4096)
    assert torch.equal(again[0], noise[5]) and not torch.equal(again[1], noise[5])


def test_fused_q_and_k_norm_rope_in_one_launch():
    """q heads use the first weight row, k heads (after them) the second."""
    from lanner.kernels.fused import norm_rope
    from lanner.kernels.fused_reference import norm_rope_ref
    from lanner.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g)
    qk = qkv[:, :6 * 16].view(5, 6, 16)
    cos, sin = RotaryEmbedding(16, 10000.0, None).cos_sin(torch.arange(5), torch.float32)
    w = torch.randn(2, 16, generator=g)
    got = norm_rope(qk, cos, sin, w, 1e-6, second_weight_from=4)
    torch.testing.assert_close(got, norm_rope_ref(qk, cos, sin, w, 1e-6, second_weight_from=4))
    torch.testing.assert_close(got[:, 4:], norm_rope_ref(qk[:, 4:], cos, sin, w[1], 1e-6))


@pytest.mark.parametrize("tokens,cache_dtype", [(5, torch.float32), (70, torch.float32), (70, FP8)])
def test_norm_rope_stores_k_and_v_into_the_cache_as_store_kv_would(tokens, cache_dtype):
    """The fused projection kernel's KV store (issue [12]: one kernel fewer a layer): the cache gets
    exactly the rotated k heads and the v heads that store_kv writes (scaled and saturated in an fp8
    cache), padding slots (-1) get nothing, and q and k come out as without the store. (Blocks of
    eight heads a program: 6 heads leave two dead rows.)"""
    from lanner.kernels.fused import norm_rope
    from lanner.kernels.fused_reference import norm_rope_ref
    from lanner.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(6)
    hq, hk, dim = 4, 2, 16
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=g)
    qk = qkv[:, :(hq + hk) * dim].view(tokens, hq + hk, dim)
    v = qkv[:, (hq + hk) * dim:].view(tokens, hk, dim)
    cos, sin = RotaryEmbedding(dim, 10000.0, None).cos_sin(torch.arange(tokens), torch.float32)
    w = torch.randn(2, dim, generator=g)
    slots = torch.randperm(tokens + 8, generator=g)[:tokens]
    slots[1::3] = -1
    caches = [torch.zeros((tokens + 8) // 4 + 1, 4, hk, dim, dtype=cache_dtype) for _ in range(4)]
    scales = (0.5, 0.01)  # an fp8 cache saturates some v values
    got = norm_rope(qk, cos, sin, w, 1e-6, second_weight_from=hq, kv_store=(v, caches[0], caches[1], slots, scales))
    want = norm_rope_ref(qk, cos, sin, w, 1e-6, second_weight_from=hq)
    torch.testing.assert_close(got, want)
    # the reference for a float32 cache; for fp8, store_kv (the interpreter's fp8 rounding is wrong for both
    # alike; tests/gpu compares store_kv's fp8 with torch's bit for bit)
    store = store_kv_ref if cache_dtype == torch.float32 else store_kv
    store(got[:, hq:].contiguous(), v, caches[2], caches[3], slots, *scales)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches[:2], caches[2:]))
    written = caches[1].float().abs().sum((2, 3)) > 0
    assert caches[0].float().abs().sum() > 0 and int(written.sum()) == int((slots >= 0).sum())


def test_norm_rope_compiles_the_same_kernel_for_every_token_count(monkeypatch):
    """CUDA graph captures warm kernels up at their largest size only, so a compile-time choice that
    changed with the token count would compile inside the capture of a smaller size (which some
    drivers refuse): the kernel's constants depend on the heads, never on the tokens."""
    import lanner.kernels.fused as fused

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constants: launches.append(constants)

    monkeypatch.setattr(fused, "_qk_norm_rope_kernel", Recorder())
    for tokens in (1, 5, 16, 63, 64, 2048):
        x = torch.zeros(tokens, 6, 16)
        cos = sin = torch.zeros(tokens, 16)
        fused.norm_rope(x, cos, sin, torch.ones(2, 16), 1e-6, second_weight_from=4)
    assert len(launches) == 6 and all(c == launches[0] for c in launches), launches


def test_a_projection_that_stores_kv_makes_that_layers_attention_skip_its_store():
    """The handshake between a fused projection and the Triton backend: inside a forward context
    the projection gets the cache and the slots, and the layer's next attention call does not store
    again; the one after it does; outside a context (piece graphs are captured there) and with the
    torch backend, the attention call stores. A record never outlives its forward context."""
    from lanner.layers.attention import Attention, forward_context
    from lanner.layers.attention.torch_backend import TorchAttentionBackend
    from lanner.layers.attention.triton_backend import TritonAttentionBackend

    def caches():
        return [(torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)) for _ in range(2)]

    batch = ForwardBatch(torch.zeros(3, dtype=torch.long), torch.arange(3), torch.tensor([4, 5, 6]), [3], [3],
                         [[1]], torch.arange(1), 3)
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    layer = Attention(1, 0.25)
    assert layer.kv_store_target() is None  # no forward context
    torch_backend = TorchAttentionBackend(caches(), 4)
    torch_backend.plan(batch)
    with forward_context(torch_backend):
        assert layer.kv_store_target() is None
    backend = TritonAttentionBackend(caches(), 4, 4, 16, 4, max_tokens=8)
    backend.plan(batch)
    k_cache, v_cache = backend.kv_caches[1]
    with forward_context(backend):
        k_target, v_target, slots, scales = layer.kv_store_target()
        assert k_target is k_cache and v_target is v_cache and slots is batch.slot_mapping and scales == (1.0, 1.0)
        layer(q, k, v)
        assert k_cache.abs().sum() == 0  # the projection's kernel stores, not the attention call
        layer(q, k, v)
        assert torch.equal(k_cache[1, :3], k) and torch.equal(v_cache[1, :3], v)
        layer.kv_store_target()
    k_cache.zero_()
    with forward_context(backend):  # the record of the forward above is gone
        layer(q, k, v)
    assert torch.equal(k_cache[1, :3], k)


def test_both_backends_apply_the_kv_scales_alike():
    """A backend's per-layer (k_scale, v_scale) (a checkpoint's, for an fp8 cache) reach its store,
    the fused projection's store target and its attention: the Triton backend (interpreter; float32
    caches here, the interpreter's fp8 rounding being wrong) caches K / k_scale and V / v_scale as the
    torch backend does, and both attend to the result of an unscaled cache (the scales cancel)."""
    from lanner.layers.attention import Attention, forward_context
    from lanner.layers.attention.torch_backend import TorchAttentionBackend
    from lanner.layers.attention.triton_backend import TritonAttentionBackend

    scales = [(1.0, 1.0), (0.3, 3.0)]
    batch = ForwardBatch(torch.zeros(5, dtype=torch.long), torch.arange(5), torch.tensor([4, 5, 6, 7, 8]), [5], [5],
                         [[1, 2]], torch.arange(1), 5)
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    layer, outs, caches = Attention(1, 0.25), [], []
    for make in (lambda c: TorchAttentionBackend(c, 4, scales),
                 lambda c: TritonAttentionBackend(c, 4, 4, 16, 4, 8, scales), lambda c: TorchAttentionBackend(c, 4)):
        backend = make([(torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)) for _ in range(2)])
        backend.plan(batch)
        with forward_context(backend):
            outs.append(layer(q, k, v))
            target = layer.kv_store_target()
        caches.append(backend.kv_caches[1])
        assert target is None or target[3] == (0.3, 3.0)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    torch.testing.assert_close(caches[0][0].view(-1, 2, 16)[4:9], k * (1 / 0.3))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)  # the scales cancel out


def test_the_throughput_breakdown_sorts_kernels_by_kind():
    from lanner.bench.breakdown import kernel_kind

    assert kernel_kind("_prefill_kernel") == "attention_prefill"
    assert kernel_kind("_decode_split_kernel") == "attention_decode"
    assert kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm"  # cuBLAS on Hopper
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kernel_kind("_moe_gemm_kernel") == "moe"  # the fused MoE GEMM is MoE's, not the dense GEMMs'
    assert kernel_kind("_qk_norm_rope_kernel") == "norm_rope_act"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == "other"
