"""fused_moe on the GPU with Qwen3-30B-A3B expert shapes in bf16: both layouts against
moe_reference, the layouts against theirs, and both captured in a CUDA graph and replayed with new
inputs under sync debug mode "error", equal to eager."""
from __future__ import annotations

import pytest
import torch

from lanner.kernels.moe.align import align_by_expert, masked_layout
from lanner.kernels.moe.configs import LAYOUTS
from lanner.kernels.moe.fused import fused_moe
from lanner.kernels.moe.reference import align_reference, masked_layout_reference, moe_reference

E, K, H, I = 128, 8, 2048, 768
TOKENS = [1, 4, 16, 64, 256, 1024]


@pytest.fixture(scope="module")
def experts():
    g = torch.Generator("cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device="cuda") / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g, device="cuda") / I ** 0.5).bfloat16()
    return w13, w2


def problem(T: int, seed: int, padding_rows: int = 0):
    """x, topk_ids (distinct random experts per token; the last `padding_rows` rows all -1), weights."""
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
    weights, ids = torch.rand(T, E, generator=g, device="cuda").softmax(-1).topk(K, dim=-1)
    ids = ids.to(torch.int32)
    ids[T - padding_rows:] = -1
    return x, ids, (weights / weights.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("T", TOKENS)
def test_layouts(T):
    _, ids, _ = problem(T, seed=T, padding_rows=T // 4)
    for block_m in (16, 64):
        for got, want in zip(align_by_expert(ids, E, block_m), align_reference(ids, E, block_m)):
            assert torch.equal(got, want)
    for got, want in zip(masked_layout(ids, E, T), masked_layout_reference(ids, E, T)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T", TOKENS)
def test_fused_moe_matches_reference(experts, T, layout):
    w13, w2 = experts
    padding = T // 4
    x, ids, weights = problem(T, seed=T, padding_rows=padding)
    out = fused_moe(x, w13, w2, ids, weights, layout)
    torch.testing.assert_close(out.float(), moe_reference(x, w13, w2, ids, weights).float(), atol=1e-2, rtol=1e-2)
    assert torch.all(out[T - padding:] == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T", [1, 16, 256])
def test_graph_replay_with_new_inputs_equals_eager(experts, T, layout):
    w13, w2 = experts
    x, ids, weights = problem(T, seed=1)
    fused_moe(x, w13, w2, ids, weights, layout)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, ids, weights, layout)
    new_x, new_ids, new_weights = problem(T, seed=2, padding_rows=T // 2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.copy_(new_x)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        graph.replay()
        eager = fused_moe(new_x, w13, w2, new_ids, new_weights, layout)  # the eager path has no syncs either
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, eager)
    torch.testing.assert_close(out.float(), moe_reference(new_x, w13, w2, new_ids, new_weights).float(),
                               atol=1e-2, rtol=1e-2)


def test_nan_logits_route_to_real_experts_and_the_layouts_stay_in_bounds():
    """Garbage reaching the router (NaN rows) picks ids inside the layer, and the layouts built
    from them write nothing out of bounds: an id past the experts once faulted the scatter."""
    from lanner.kernels.moe.routing import route

    logits = torch.randn(300, E, device="cuda")
    logits[::3] = float("nan")
    for scoring in ("softmax", "sigmoid"):
        ids, _ = route(logits, K, scoring=scoring, renormalize=True)
        assert bool(((ids >= 0) & (ids < E)).all())
        align_by_expert(ids, E, 16)
        masked_layout(ids[:16], E, 16)
    torch.cuda.synchronize()
