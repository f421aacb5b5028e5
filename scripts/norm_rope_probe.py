"""The q/k norm + rotary (+ KV store) kernel's time against heads per program and warps, on
Qwen3-0.6B's and Qwen3-8B's heads, each launch inside a CUDA graph of 50 (no launch overhead);
and the unfused pair it replaces (norm_rope, then store_kv). Prints JSON lines.
Usage: python scripts/norm_rope_probe.py"""
from __future__ import annotations

import json

import torch
import triton

from lanner.bench.common import time_ms
from lanner.kernels.attention.store_kv import store_kv
from lanner.kernels.fused import _qk_norm_rope_kernel, norm_rope, norm_rope_heads_per_program


def graph_us(fn) -> float:
    return round(time_ms(fn, 5, graph=True, calls=50) * 1e3, 2)


def probe(name: str, hq: int, hk: int, T: int, dim: int = 128, dtype=torch.bfloat16) -> dict:
    qkv = torch.randn(T, (hq + 2 * hk) * dim, dtype=dtype, device="cuda")
    qk, v = qkv[:, :(hq + hk) * dim].view(T, hq + hk, dim), qkv[:, (hq + hk) * dim:].view(T, hk, dim)
    cos, sin = torch.randn(T, dim, dtype=dtype, device="cuda"), torch.randn(T, dim, dtype=dtype, device="cuda")
    w = torch.randn(2, dim, dtype=dtype, device="cuda")
    slots = torch.arange(T, device="cuda")
    kc, vc = (torch.zeros(T // 16 + 1, 16, hk, dim, dtype=dtype, device="cuda") for _ in range(2))
    out = torch.empty(T, hq + hk, dim, dtype=dtype, device="cuda")
    H = hq + hk

    def unfused():
        norm_rope(qk, cos, sin, w, 1e-6, hq, out)
        store_kv(out[:, hq:], v, kc, vc, slots)

    def launch(heads, warps):
        _qk_norm_rope_kernel[(T, triton.cdiv(H, heads))](
            qk, out, w, cos, sin, qk.stride(0), qk.stride(1), H, hq, 1e-6, v, v.stride(0), kc, vc, slots, hk, 1.0, 1.0,
            HAS_NORM=True, STORE_KV=True, HALF=dim // 2, HEADS=heads, PDL=False, num_warps=warps)

    row = {"model": name, "tokens": T, "chosen_heads": norm_rope_heads_per_program(H),
           "fused_chosen_us": graph_us(lambda: norm_rope(qk, cos, sin, w, 1e-6, hq, out, (v, kc, vc, slots))),
           "unfused_pair_us": graph_us(unfused),
           "by_heads_warps": {f"{h}x{nw}": graph_us(lambda h=h, nw=nw: launch(h, nw))
                              for h in (1, 2, 4, 8, 16) for nw in (1, 2, 4, 8)}}
    row["best"] = min(row["by_heads_warps"].items(), key=lambda kv: kv[1])
    return row


def main() -> None:
    for name, hq, hk in (("qwen3-0.6b", 16, 8), ("qwen3-8b", 32, 8)):
        for T in (1, 4, 64, 512, 2048):
            print(json.dumps(probe(name, hq, hk, T)), flush=True)


if __name__ == "__main__":
    main()
