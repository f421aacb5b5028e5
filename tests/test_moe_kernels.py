"""The MoE Triton kernels (lanner/kernels/moe) against their torch references on small shapes,
on the CPU through TRITON_INTERPRET=1 (conftest sets it when there is no GPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lanner.kernels.moe.align import align_by_expert, masked_layout
from lanner.kernels.moe.configs import default_config, get_config, table_path
from lanner.kernels.moe.fused import fused_moe
from lanner.kernels.moe.reference import align_reference, masked_layout_reference, moe_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROUTINGS = ["random", "one_expert", "padding"]


def routing(T: int, E: int, K: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] int32 (distinct experts per token) and weights. one_expert: every token's
    first choice is the last expert; padding: rows 1 and T-1 are all -1, row 0 drops a choice."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(T, K, dtype=torch.int32)
    for t in range(T):
        ids[t] = torch.randperm(E, generator=g)[:K]
        if kind == "one_expert":
            ids[t, 1:] = torch.randperm(E - 1, generator=g)[:K - 1]
            ids[t, 0] = E - 1
    if kind == "padding" and T:
        ids[[1 % T, T - 1]] = -1
        ids[0, -1] = -1
    return ids.to(DEV), torch.rand(T, K, generator=g).to(DEV)


def weights(E: int, H: int, I: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    return w13.to(DEV), (torch.randn(E, H, I, generator=g) / I ** 0.5).to(DEV)


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("T,E,K,block_m", [(0, 4, 2, 16), (1, 4, 2, 16), (3, 8, 2, 16), (17, 8, 2, 32),
                                            (2100, 6, 2, 16)])  # the last: many tiles and blocks, E not a power of 2
def test_layouts_equal_reference(T, E, K, block_m, kind):
    ids, _ = routing(T, E, K, kind, seed=T)
    for got, want in zip(align_by_expert(ids, E, block_m), align_reference(ids, E, block_m)):
        assert torch.equal(got, want)
    for got, want in zip(masked_layout(ids, E, T), masked_layout_reference(ids, E, T)):
        assert torch.equal(got, want)


def test_layouts_leave_unrouted_entries_out():
    ids = torch.tensor([[2, -1], [-1, -1], [0, 2]], dtype=torch.int32, device=DEV)
    sorted_ids, block_experts, num_padded = align_by_expert(ids, 3, 16)
    assert sorted_ids[:16].tolist() == [4] + [6] * 15 and sorted_ids[16:18].tolist() == [0, 5]
    assert block_experts[:3].tolist() == [0, 2, -1] and num_padded.item() == 32
    assert (sorted_ids[18:] == 6).all()
    slots, counts = masked_layout(ids, 3, 3)
    assert counts.tolist() == [1, 0, 2] and slots.tolist() == [[4, -1, -1], [-1, -1, -1], [0, 5, -1]]


@pytest.mark.parametrize("T", [3, 40])  # one tile (the one-launch masked layout), several
def test_layouts_drop_ids_past_the_experts(T):
    """An id past the experts is left out like a padding entry, never written out of bounds."""
    ids, _ = routing(T, 6, 2, "random", seed=T)
    broken = ids.clone()
    broken[0, 0], broken[T - 1, 1] = 6, 7
    dropped = ids.clone()
    dropped[0, 0], dropped[T - 1, 1] = -1, -1
    for got, want in zip(align_by_expert(broken, 6, 16), align_reference(dropped, 6, 16)):
        assert torch.equal(got, want)
    for got, want in zip(masked_layout(broken, 6, T), masked_layout_reference(dropped, 6, T)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("T,E,H,I", [(0, 4, 32, 16), (1, 4, 32, 16), (3, 8, 64, 48), (17, 8, 64, 48)])
def test_fused_moe_matches_reference(T, E, H, I, kind, layout):
    w13, w2 = weights(E, H, I)
    ids, topk_weights = routing(T, E, 2, kind, seed=T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(DEV)
    out = fused_moe(x, w13, w2, ids, topk_weights, layout)
    assert out.shape == (T, H) and out.dtype == x.dtype
    torch.testing.assert_close(out, moe_reference(x, w13, w2, ids, topk_weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_fused_moe_rounds_as_the_reference_in_half_precision(layout):
    """float16 (the interpreter's bfloat16 dot is wrong): gate/up and the activation rounded where torch rounds."""
    w13, w2 = (w.half() for w in weights(8, 64, 48))
    ids, topk_weights = routing(17, 8, 2, "padding", seed=7)
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(8)).to(DEV).half()
    out = fused_moe(x, w13, w2, ids, topk_weights, layout)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, moe_reference(x, w13, w2, ids, topk_weights), atol=1e-3, rtol=1e-3)


SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("config", [SMALL_TILES, {**SMALL_TILES, "BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 1}])
def test_fused_moe_tiles_loop_and_group(config, layout):
    """Several row blocks per expert, column tiles and reduction steps, ragged edges (I = 48, H = 40)."""
    E, H, I, T = 4, 40, 48, 40
    w13, w2 = weights(E, H, I)
    ids, topk_weights = routing(T, E, 2, "one_expert", seed=3)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(4)).to(DEV)
    out = fused_moe(x, w13, w2, ids, topk_weights, layout, config)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, ids, topk_weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_padding_rows_are_zero_and_change_nothing(layout):
    """Rows of -1 ids (a CUDA graph's padding) come out zero; the real rows equal a run without them."""
    E, H, I, T = 8, 32, 16, 6
    w13, w2 = weights(E, H, I)
    ids, topk_weights = routing(T, E, 2, "random", seed=5)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(6)).to(DEV)
    alone = fused_moe(x, w13, w2, ids, topk_weights, layout)
    pad = torch.full((5, 2), -1, dtype=torch.int32, device=DEV)
    padded = fused_moe(torch.cat([x, torch.randn(5, H, device=DEV)]), w13, w2, torch.cat([ids, pad]),
                       torch.cat([topk_weights, torch.rand(5, 2, device=DEV)]), layout)
    assert torch.equal(padded[T:], torch.zeros(5, H, device=DEV))
    torch.testing.assert_close(padded[:T], alone, atol=1e-6, rtol=0)


def test_unknown_layout_is_refused():
    w13, w2 = weights(4, 32, 16)
    ids, topk_weights = routing(2, 4, 2, "random")
    with pytest.raises(ValueError, match="layout"):
        fused_moe(torch.randn(2, 32, device=DEV), w13, w2, ids, topk_weights, "sorted")


def test_get_config_reads_the_tuned_table(tmp_path):
    small = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    large = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    path = table_path(16, 64, 32, "masked", "NVIDIA Test GPU", tmp_path)
    assert path.parent.name == "NVIDIA_Test_GPU" and path.name == "E=16,H=64,I=32,masked.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"4": small, "256": large}))
    lookup = lambda T, layout="masked": get_config(16, 64, 32, T, layout, "NVIDIA Test GPU", tmp_path)
    assert lookup(1) == small  # below the smallest entry: the smallest
    assert lookup(4) == lookup(255) == small and lookup(256) == lookup(10**6) == large
    assert lookup(4, "contiguous") == default_config(4)  # no table for that layout
    assert get_config(16, 64, 32, 4, "masked", "other GPU", tmp_path) == default_config(4)
    assert default_config(1)["BLOCK_M"] < default_config(16384)["BLOCK_M"]


def test_reference_and_configs_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lanner.kernels.moe, lanner.kernels.moe.reference, lanner.kernels.moe.configs\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_moe_smoke(tmp_path):
    from lanner.cli import main

    out = tmp_path / "moe.json"
    assert main(["bench", "moe", "--experts", "4", "--top-k", "2", "--hidden", "32", "--intermediate", "16",
                 "--dtype", "float32", "--token-counts", "1", "5", "--repeats", "1", "--reference-max-tokens", "1",
                 "--output-json", str(out)]) == 0
    rec = json.loads(out.read_text())
    one, five = rec["results"]["runs"]
    assert rec["benchmark"] == "moe" and one["tokens"] == 1 and five["tokens"] == 5
    assert one["contiguous_max_abs_diff"] < 1e-5 and one["masked_max_abs_diff"] < 1e-5
    assert "reference_ms" not in five and five["contiguous_ms"] > 0 and "masked_fraction_of_bound" in five
