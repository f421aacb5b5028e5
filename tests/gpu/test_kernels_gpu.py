"""Triton attention kernels against the torch references on real shapes:
GQA/MQA/MHA, head dims 64/128/256, block sizes 16/32/64, fp16/bf16, contexts up
to 32k and odd lengths."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import paged_problem, tile_table
from lanner.kernels.attention.decode import decode_attention, num_decode_splits
from lanner.kernels.attention.prefill import prefill_attention
from lanner.kernels.attention.reference import decode_attention_ref, prefill_attention_ref, store_kv_ref
from lanner.kernels.attention.store_kv import store_kv

DECODE_CASES = [  # heads, kv_heads, dim, page, seq_lens
    (32, 8, 128, 16, [1, 7, 129, 1000, 4097]),
    (16, 8, 128, 32, [32768, 3, 511]),
    (64, 8, 128, 16, [32768]),
    (8, 1, 64, 64, [17, 2049, 8191]),
    (8, 8, 256, 16, [333, 12000]),
    (16, 2, 256, 32, [1, 32768]),
    (14, 2, 64, 16, [0, 95, 0, 4000]),  # padding rows
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim,page,seq_lens", DECODE_CASES)
def test_decode(heads, kv_heads, dim, page, seq_lens, dtype):
    q, kc, vc, bt, sl, _ = paged_problem(seq_lens, [1] * len(seq_lens), heads, kv_heads, dim, page, dtype, "cuda")
    ref = decode_attention_ref(q, kc, vc, bt, sl, dim ** -0.5)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for splits in {1, num_decode_splits(len(seq_lens), kv_heads, max(seq_lens), sms), 16}:
        out = decode_attention(q, kc, vc, bt, sl, dim ** -0.5, num_splits=splits)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_decode_last_split_merge_is_race_free_and_replays_in_a_graph():
    """The last split of each (sequence, kv head) merges all of them (an atomic count): 64 sequences x
    16 splits, 50 calls in one CUDA graph over one workspace whose partials are set to NaN before each
    call (so a merge that read a partial before its write landed would give NaN), replayed 3 times,
    equal the first call bit for bit every time, and the counters are zero after."""
    from lanner.kernels.attention.decode import decode_workspace

    seq_lens = [1 + (i * 977) % 6000 for i in range(64)]
    q, kc, vc, bt, sl, _ = paged_problem(seq_lens, [1] * 64, 32, 8, 128, 16, torch.bfloat16, "cuda")
    workspace = decode_workspace(64 * 16, 32, 128, 64 * 8, "cuda")
    first = decode_attention(q, kc, vc, bt, sl, 128 ** -0.5, num_splits=16, workspace=workspace)
    torch.testing.assert_close(first.float(), decode_attention_ref(q, kc, vc, bt, sl, 128 ** -0.5).float(),
                               atol=2e-2, rtol=2e-2)
    outs = torch.empty(50, *q.shape, dtype=q.dtype, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(50):
            workspace[0].fill_(float("nan"))
            workspace[1].fill_(float("nan"))
            decode_attention(q, kc, vc, bt, sl, 128 ** -0.5, num_splits=16, workspace=workspace, out=outs[i])
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs, first.expand_as(outs)) and not workspace[2].any()


PREFILL_CASES = [  # heads, kv_heads, dim, page, seq_lens, q_lens
    (32, 8, 128, 16, [513, 77, 1], [513, 30, 1]),
    (16, 8, 128, 32, [4096, 1000], [4096, 999]),
    (8, 8, 256, 16, [2000, 37], [1500, 37]),
    (8, 1, 64, 64, [32768], [1024]),  # a chunk on top of a 31k cached prefix
    (16, 2, 128, 16, [32768, 5], [331, 5]),
    (12, 4, 64, 32, [8191], [8191]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim,page,seq_lens,q_lens", PREFILL_CASES)
def test_prefill(heads, kv_heads, dim, page, seq_lens, q_lens, dtype):
    q, kc, vc, bt, sl, qs = paged_problem(seq_lens, q_lens, heads, kv_heads, dim, page, dtype, "cuda")
    out = prefill_attention(q, kc, vc, bt, sl, qs, tile_table(q_lens, seq_lens, q, kc), dim ** -0.5)
    ref = prefill_attention_ref(q, kc, vc, bt, sl, qs, dim ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kv(dtype):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1000, 8, 128, generator=g).to(dtype).cuda()
    v = torch.randn(1000, 8, 128, generator=g).to(dtype).cuda()
    slots = torch.randperm(64 * 16, generator=g)[:1000].cuda()
    slots[::7] = -1
    a = [torch.zeros(64, 16, 8, 128, dtype=dtype, device="cuda") for _ in range(4)]
    store_kv(k, v, a[0], a[1], slots)
    store_kv_ref(k, v, a[2], a[3], slots)
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], a[3])


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kv_fp8_rounds_and_saturates_as_torch(dtype):
    """Random values (some past e4m3's range after the scale) rounded into an fp8 cache bit for bit
    as torch's cast of the saturated value."""
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(1000, 8, 128, generator=g) * 100).to(dtype).cuda()
    v = torch.randn(1000, 8, 128, generator=g).to(dtype).cuda()
    slots = torch.randperm(64 * 16, generator=g)[:1000].cuda()
    slots[::7] = -1
    a = [torch.zeros(64, 16, 8, 128, dtype=FP8, device="cuda") for _ in range(4)]
    store_kv(k, v, a[0], a[1], slots, k_scale=0.5, v_scale=0.01)
    store_kv_ref(k, v, a[2], a[3], slots, k_scale=0.5, v_scale=0.01)
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a[:2], a[2:]))
    assert a[0].float().abs().max() == 448.0 and not a[1].float().isnan().any()


@pytest.mark.parametrize("heads,kv_heads,dim,page,seq_lens", DECODE_CASES[:3] + DECODE_CASES[5:])
def test_decode_and_prefill_over_an_fp8_cache(heads, kv_heads, dim, page, seq_lens):
    q, kc, vc, bt, sl, qs = paged_problem(seq_lens, [1] * len(seq_lens), heads, kv_heads, dim, page,
                                          torch.bfloat16, "cuda")
    k8, v8 = fp8_cache(kc, 0.5), fp8_cache(vc, 2.0)
    ref = decode_attention_ref(q, k8, v8, bt, sl, dim ** -0.5, 0.5, 2.0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for splits in {1, num_decode_splits(len(seq_lens), kv_heads, max(seq_lens), sms)}:
        out = decode_attention(q, k8, v8, bt, sl, dim ** -0.5, num_splits=splits, k_scale=0.5, v_scale=2.0)
        torch.testing.assert_close(out.float(), ref.float(), atol=4e-2, rtol=2e-2)
    seq_lens = [s for s in seq_lens if s]
    q_lens = [min(s, 300) for s in seq_lens]
    q, kc, vc, bt, sl, qs = paged_problem(seq_lens, q_lens, heads, kv_heads, dim, page, torch.bfloat16, "cuda")
    k8, v8 = fp8_cache(kc, 0.5), fp8_cache(vc, 2.0)
    out = prefill_attention(q, k8, v8, bt, sl, qs, tile_table(q_lens, seq_lens, q, kc), dim ** -0.5, k_scale=0.5,
                            v_scale=2.0)
    ref = prefill_attention_ref(q, k8, v8, bt, sl, qs, dim ** -0.5, 0.5, 2.0)
    torch.testing.assert_close(out.float(), ref.float(), atol=4e-2, rtol=2e-2)


def fp8_cache(cache: torch.Tensor, scale: float) -> torch.Tensor:
    from lanner.kernels.attention.reference import to_cache_ref

    return to_cache_ref(cache, FP8, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,hidden", [(1, 1024), (257, 4096), (8192, 1024), (3, 7168)])
def test_fused_rms_norm(T, hidden, dtype):
    from lanner.kernels.fused import rms_norm
    from lanner.kernels.fused_reference import rms_norm_ref

    x, r = torch.randn(T, hidden, dtype=dtype, device="cuda"), torch.randn(T, hidden, dtype=dtype, device="cuda")
    w = torch.randn(hidden, dtype=dtype, device="cuda")
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=2e-2, rtol=2e-2)
    r1 = r.clone()
    out, _ = rms_norm(x, w, 1e-6, r1)
    want, want_res = rms_norm_ref(x, w, 1e-6, r.clone())
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(r1, want_res)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,heads,dim,norm", [(1, 32, 128, True), (300, 8, 128, False), (64, 4, 64, True),
                                              (5, 2, 256, True)])
def test_fused_norm_rope(T, heads, dim, norm, dtype):
    from lanner.kernels.fused import norm_rope
    from lanner.kernels.fused_reference import norm_rope_ref
    from lanner.layers.rotary import RotaryEmbedding

    qkv = torch.randn(T, 3 * heads * dim, dtype=dtype, device="cuda")
    q = qkv[:, :heads * dim].view(T, heads, dim)
    rope = RotaryEmbedding(dim, 1e6, None).cuda()
    cos, sin = rope.cos_sin(torch.randint(0, 30000, (T,), device="cuda"), dtype)
    w = torch.randn(dim, dtype=dtype, device="cuda") if norm else None
    torch.testing.assert_close(norm_rope(q, cos, sin, w), norm_rope_ref(q, cos, sin, w), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,inter", [(1, 3072), (513, 12288), (7, 100)])
def test_fused_silu_and_mul(T, inter, dtype):
    from lanner.kernels.fused import silu_and_mul
    from lanner.kernels.fused_reference import silu_and_mul_ref

    x = torch.randn(T, 2 * inter, dtype=dtype, device="cuda")
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_q_and_k_norm_rope_one_launch(dtype):
    from lanner.kernels.fused import norm_rope
    from lanner.kernels.fused_reference import norm_rope_ref
    from lanner.layers.rotary import RotaryEmbedding

    T, hq, hk, dim = 37, 32, 8, 128
    qkv = torch.randn(T, (hq + 2 * hk) * dim, dtype=dtype, device="cuda")
    qk = qkv[:, :(hq + hk) * dim].view(T, hq + hk, dim)
    cos, sin = RotaryEmbedding(dim, 1e6, None).cuda().cos_sin(torch.randint(0, 30000, (T,), device="cuda"), dtype)
    w = torch.randn(2, dim, dtype=dtype, device="cuda")
    torch.testing.assert_close(norm_rope(qk, cos, sin, w, 1e-6, hq), norm_rope_ref(qk, cos, sin, w, 1e-6, hq),
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("T", [1, 37, 512, 2048])
def test_fused_norm_rope_with_kv_store_equals_store_kv(T):
    """Qwen3-8B's heads: the projection kernel's cache writes are store_kv's, bit for bit, padding
    slots skipped, and its q and k are the kernel's own without the store."""
    from lanner.kernels.attention.store_kv import store_kv
    from lanner.kernels.fused import norm_rope
    from lanner.layers.rotary import RotaryEmbedding

    hq, hk, dim, dtype = 32, 8, 128, torch.bfloat16
    qkv = torch.randn(T, (hq + 2 * hk) * dim, dtype=dtype, device="cuda")
    qk, v = qkv[:, :(hq + hk) * dim].view(T, hq + hk, dim), qkv[:, (hq + hk) * dim:].view(T, hk, dim)
    cos, sin = RotaryEmbedding(dim, 1e6, None).cuda().cos_sin(torch.randint(0, 30000, (T,), device="cuda"), dtype)
    w = torch.randn(2, dim, dtype=dtype, device="cuda")
    slots = torch.randperm(T + 64, device="cuda")[:T]
    slots[T // 2] = -1
    caches = [torch.zeros((T + 64) // 16 + 1, 16, hk, dim, dtype=dtype, device="cuda") for _ in range(4)]
    got = norm_rope(qk, cos, sin, w, 1e-6, hq, kv_store=(v, caches[0], caches[1], slots, (1.0, 1.0)))
    assert torch.equal(got, norm_rope(qk, cos, sin, w, 1e-6, hq))
    store_kv(got[:, hq:], v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    fp8 = [torch.zeros_like(c, dtype=FP8) for c in caches]  # an fp8 cache: the same bits as store_kv's
    norm_rope(qk, cos, sin, w, 1e-6, hq, kv_store=(v, fp8[0], fp8[1], slots, (0.25, 0.5)))
    store_kv(got[:, hq:], v, fp8[2], fp8[3], slots, 0.25, 0.5)
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(fp8[:2], fp8[2:]))


@pytest.mark.parametrize("B,V", [(1, 151936), (64, 151936), (7, 32000), (256, 1000)])
def test_race_sample_matches_reference(B, V):
    from lanner.kernels.sampling import race_sample
    from lanner.kernels.sampling_reference import race_noise_ref, row_key

    probs = torch.softmax(4 * torch.randn(B, V, device="cuda"), dim=-1)
    keys = torch.tensor([row_key(1000 + i, i * 7) for i in range(B)], device="cuda")
    got = race_sample(probs, keys)
    scores = probs / race_noise_ref(keys, V)
    chosen = scores.gather(1, got[:, None])[:, 0]
    torch.testing.assert_close(chosen, scores.max(dim=1).values, rtol=1e-5, atol=0)


def test_race_sample_distribution_on_gpu():
    from lanner.kernels.sampling import race_sample
    from lanner.kernels.sampling_reference import row_key

    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0], device="cuda")
    n = 50000
    keys = torch.tensor([row_key(11, i) for i in range(n)], device="cuda")
    freq = torch.bincount(race_sample(p.repeat(n, 1), keys), minlength=6).float() / n
    assert freq[5] == 0 and (freq - p).abs().max() < 0.01, freq


@pytest.mark.parametrize("B,V,scale", [(256, 151936, 1.0), (256, 151936, 6.0), (1, 151936, 3.0), (33, 128256, 0.3),
                                       (5, 4097, 3.0)])
def test_top_p_threshold_matches_reference(B, V, scale):
    """The search's threshold is the sorted cumulative sum's, except where that sum is within float32
    rounding of top_p (the two add in different orders); bf16 logits make ties."""
    from lanner.kernels.top_p import top_p_threshold
    from lanner.kernels.top_p_reference import top_p_threshold_ref

    g = torch.Generator(device="cuda").manual_seed(B)
    logits = (scale * torch.randn(B, V, device="cuda", generator=g)).to(torch.bfloat16).float()
    probs = logits.softmax(dim=-1)
    top_p = torch.rand(B, device="cuda", generator=g).clamp(min=1e-4)
    top_p[:4] = torch.tensor([0.9, 0.95, 1e-6, 0.999999], device="cuda")[:B]
    got, want = top_p_threshold(probs, top_p), top_p_threshold_ref(probs, top_p)
    differ = (got != want).nonzero().flatten().tolist()
    for row in differ:  # both must sit where the mass of the tokens at or above them is within rounding of top_p
        for t in (got[row], want[row]):
            mass = probs[row][probs[row] >= t].double().sum()
            above = probs[row][probs[row] > t].double().sum()
            assert above < top_p[row] + 1e-5 and mass > top_p[row] - 1e-5, (row, t, top_p[row])
    assert len(differ) <= max(1, B // 50), differ


def test_top_p_filter_matches_the_sorted_path_on_gpu():
    """Rows with top-p alone take the search; where no tie straddles a threshold they keep what the
    sort keeps, and each row keeps the same tokens alone as beside other rows."""
    from lanner.core.request import SamplingParams
    from lanner.sampling import sampler

    g = torch.Generator(device="cuda").manual_seed(3)
    logits = 4 * torch.randn(12, 151936, device="cuda", generator=g)
    params = [SamplingParams(temperature=0.6, top_p=0.9), SamplingParams(temperature=1.0, top_p=0.5, min_p=0.05),
              SamplingParams(temperature=0.8, top_k=20)] * 4
    batch = sampler.processed_probs(logits, params)
    alone = torch.cat([sampler.processed_probs(logits[i:i + 1], [p]) for i, p in enumerate(params)])
    assert torch.equal(batch > 0, alone > 0)
    sorted_path = sampler._filtered(logits / 0.6, torch.tensor([[0.6, 151936, 0.9, 0.0]], device="cuda"),
                                    151936, False)
    assert torch.equal(batch[0] > 0, sorted_path[0] > float("-inf"))
