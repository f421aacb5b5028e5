# Can a plain Triton GEMM beat cuBLAS on the decode steps' GEMMs (issue [12]: W-8B's 256-row GEMMs run
# 576 TFLOP/s under cuBLAS, and the 4,096-wide ones fill under 100 of the H100's 132 multiprocessors
# with 128-wide tiles)? y = x @ w.T for x [M, K], w [N, K] (F.linear's layout), bf16 in, fp32 sums, a
# tile grid over (M, N) in grouped order, timed in CUDA graphs against F.linear. CFG (qwen3-8b), ROWS
# (default "256 128"), TILES ("BM,BN,BK,warps,stages ..."), SPLIT_K (default "1 2").
import json
import os

import torch
import triton
import triton.language as tl
from probe_env import env_tuples, layer_gemm_shapes
from transformers import AutoConfig
from triton.runtime.errors import OutOfResources

from lanner.bench.common import time_ms


@triton.jit
def _linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], tl.float32)
    span = tl.cdiv(K, BK * SPLIT_K) * BK
    for k0 in range(split * span, tl.minimum(K, (split + 1) * span), BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=rows[:, None] < M, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cols[:, None] < N, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok)


def linear(x, w, tile, split_k):
    bm, bn, bk, warps, stages = tile
    M, K = x.shape
    N = w.shape[0]
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32) if split_k > 1 else torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split_k)
    _linear_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk, SPLIT_K=split_k,
                         num_warps=warps, num_stages=stages)
    return y


cfg = AutoConfig.from_pretrained(os.environ.get("CFG", "benchmarks/configs/qwen3-8b.json"))
shapes = layer_gemm_shapes(cfg)
tiles = env_tuples("TILES", [(128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 128, 4, 3),
                             (256, 64, 64, 8, 3), (64, 64, 128, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)])
results = {"gpu": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count}
for m in [int(r) for r in os.environ.get("ROWS", "256 128").split()]:
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = torch.nn.functional.linear(x, w).float()
        row = {"cublas_ms": round(time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w), 20, graph=True, calls=5), 4)}
        for tile in tiles:
            for split in [int(s) for s in os.environ.get("SPLIT_K", "1 2").split()]:
                key = f"{','.join(map(str, tile))}/s{split}"
                try:
                    got = linear(x, w, tile, split).float()
                    if not torch.allclose(got, want, atol=0.05, rtol=0.02):
                        row[key] = "wrong"
                        continue
                    row[key] = round(time_ms(lambda x=x, w=w, t=tile, s=split: linear(x, w, t, s), 20, graph=True, calls=5), 4)
                except OutOfResources as e:  # a tile that does not fit (shared memory)
                    row[key] = type(e).__name__
        best = min((v, k) for k, v in row.items() if isinstance(v, float) and k != "cublas_ms")
        row["best"] = best[1]
        row["best_vs_cublas"] = round(row["cublas_ms"] / best[0], 3)
        results[f"{name}/m{m}"] = row
        print(name, m, row["cublas_ms"], best, row["best_vs_cublas"], flush=True)
print(json.dumps(results, indent=1))
