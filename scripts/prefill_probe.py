"""Prefill attention over tile shapes (issue [12]): single prompts of 64 to 2k tokens and a mixed
step (a 448-token prompt chunk and 64 decode rows over 1k keys), Qwen3-0.6B's 16 and Qwen3-8B's 32
query heads over 8 KV heads of 128 dims (tiles of rows = positions x the GQA group), one layer, bf16. Prints, per shape, the default tile's time
and the best tile's, and the causal attention FLOP rate. Each time is of CUDA graph replays (20 calls a
graph), as the whole-forward graphs run the kernel: eager calls of small steps time the Python launcher.
  PYTHONPATH=. [KV_DTYPE=fp8] [DEFAULT_ONLY=1] python3 scripts/prefill_probe.py [OUT.json]
KV_DTYPE=fp8: the cache in e4m3 (--kv-cache-dtype fp8); DEFAULT_ONLY=1: the default tile alone;
TILES="32,64,4,1 32,32,4,2": these tiles (rows, keys, warps, stages) and the default; SHAPES="16h-p512":
these shapes only. The default tile runs first; every other tile's output must match its."""
import functools
import json
import os
import sys

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, "tests")
from kernel_cases import fp8_caches, paged_problem
from probe_env import env_named, env_tuples

from lanner.bench.common import time_ms
from lanner.kernels.attention.prefill import prefill_attention, prefill_tile, prefill_tiles, tile_positions

SHAPES = [(f"{heads}h-{name}", heads, seq_lens, q_lens) for heads in (16, 32) for name, seq_lens, q_lens in (
    ("p64", [64], [64]), ("p512", [512], [512]), ("p2048", [2048], [2048]),
    ("mixed", [448] + [1000] * 64, [448] + [1] * 64))]
TILES = [(rows, keys, w, stages) for rows in (16, 32, 64, 128) for keys in (64, 128) for w in (4, 8)
         for stages in (2, 3)]
FP8 = os.environ.get("KV_DTYPE") == "fp8"
TILES = env_tuples("TILES", TILES)
SHAPES = env_named("SHAPES", SHAPES)


def main() -> None:
    rows = []
    for name, heads, seq_lens, q_lens in SHAPES:
        q, kc, vc, bt, sl, qs = paged_problem(seq_lens, q_lens, heads, 8, 128, 16, torch.bfloat16, "cuda")
        if FP8:
            kc, vc = fp8_caches(kc, vc)
        keys = sum(s - n + i + 1 for s, n in zip(seq_lens, q_lens) for i in range(n))
        flop = 4 * 128 * heads * keys
        ref = None
        best = None
        default_tile = prefill_tile(128, heads // 8, sum(q_lens))
        for tile in [default_tile] if os.environ.get("DEFAULT_ONLY") else list(dict.fromkeys([default_tile, *TILES])):
            table = torch.from_numpy(prefill_tiles(q_lens, seq_lens, tile_positions(tile, heads // 8))).cuda()
            programs = table.shape[0] - 1  # a program a tile, as an eager step plans it

            run = functools.partial(prefill_attention, q, kc, vc, bt, sl, qs, table, 0.08, num_programs=programs,
                                    tile=tile)
            try:
                out = run()
                ref = out if ref is None else ref
                torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
                ms = time_ms(run, 10, graph=True, calls=20)
            except OutOfResources as e:  # a tile too big for shared memory
                print(name, tile, "failed:", str(e)[:80])
                continue
            row = {"shape": name, "tile": tile, "us": round(ms * 1e3, 1), "tflops": round(flop / ms / 1e9, 1),
                   "default": tile == default_tile}
            rows.append(row)
            if best is None or ms < best[0]:
                best = (ms, row)
        default = next(r for r in rows if r["shape"] == name and r["default"])
        top = sorted((r for r in rows if r["shape"] == name), key=lambda r: r["us"])[:4]
        print(f"{name}: default {default['tile']} {default['us']} us {default['tflops']} TFLOP/s; best "
              + "; ".join(f"{r['tile']} {r['us']} us {r['tflops']}" for r in top), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "kv": "fp8" if FP8 else "bf16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
