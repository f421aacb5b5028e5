"""The fused add + RMSNorm kernel's time against its warps, on Qwen3-0.6B's and Qwen3-8B's hidden
sizes at batch-1 decode, batch-256 decode and prompt-step token counts, each launch inside a CUDA
graph of 50 (no launch overhead), with the bytes it moves as GB/s. `rms_norm_warps` chose the
`chosen` column (issue [12]: W-8B's decode step spent ~1 ms in norms, ~7x its bytes at full
bandwidth). Prints JSON lines.
Usage: python scripts/rms_norm_probe.py"""
from __future__ import annotations

import json

import torch

from lanner.bench.common import time_ms
from lanner.kernels import next_power_of_2
from lanner.kernels.fused import _rms_norm_kernel, rms_norm_warps


def probe(hidden: int, tokens: int, dtype=torch.bfloat16) -> dict:
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    residual = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    w = torch.randn(hidden, dtype=dtype, device="cuda")
    out = torch.empty_like(x)
    block = next_power_of_2(hidden)
    moved = (4 * tokens + 1) * hidden * x.element_size()  # x read, residual read and written, out written, w

    def launch(warps):
        _rms_norm_kernel[(tokens,)](x, residual, w, out, x.stride(0), residual.stride(0), out.stride(0), hidden,
                                    1e-6, HAS_RES=True, BLOCK=block, PDL=False, num_warps=warps)

    row = {"hidden": hidden, "tokens": tokens, "chosen": rms_norm_warps(block)}
    for warps in (2, 4, 8, 16):
        us = time_ms(lambda: launch(warps), 5, graph=True, calls=50) * 1e3
        row[f"warps{warps}_us"] = round(us, 2)
        row[f"warps{warps}_GBps"] = round(moved / us / 1e3)
    return row


def main() -> None:
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for hidden in (1024, 4096):
        for tokens in (1, 8, 64, 256, 512, 2048, 8192):
            print(json.dumps(probe(hidden, tokens)), flush=True)


if __name__ == "__main__":
    main()
