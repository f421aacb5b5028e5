"""Decode attention against the KV-read bound, over tile shapes (issue [12]): batch 256 with the
contexts of W-8B and W-nano (and batch 1 / 16 at 8k), Qwen3's 32/16 query heads over 8 KV heads of
128 dims, one layer. Prints, per shape and tile, the kernel time and the KV bandwidth it reached.
  PYTHONPATH=. [KV_DTYPE=fp8] python3 scripts/decode_probe.py [OUT.json]
KV_DTYPE=fp8: the cache in e4m3 (--kv-cache-dtype fp8), half the bytes to read. TILES="64,1,2 128,2,2":
these tiles only (keys, warps, stages); SPLITS=N: N times the engine's split count; SHAPES="w8b-b256":
these shapes only (names below); SORTED=1: each shape also with its sequences longest first (the
programs start in sequence order, so the long ones no longer end the launch alone). Each time is of
CUDA graph replays (10 calls a graph, the outputs and workspace made once), as a decode graph runs
the kernel: eager calls time the launch's Python and allocations (~280 us at batch 256, 2026-12-06).
SPLIT_KEYS="64/128 64 128 256": instead, batch 1 at 128-8k keys (16 and 32 query heads) with a split per
that many keys of the sequence (`min_split_keys`; the engine's is MIN_SPLIT_KEYS) and, after a slash,
one split up to that many keys (`one_split_keys`, ONE_SPLIT_KEYS; without one: the split's), the default tile,
timed in CUDA graphs of 20 calls with dependent launch where the GPU has it, as a decode graph runs
(one layer's cache, so up to ~8 MiB of it stays in L2 between calls, which a model's other layers
would evict: the short contexts read as a lower bound)."""
import functools
import json
import os
import random
import sys

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, "tests")
from kernel_cases import fp8_caches, paged_problem
from probe_env import env_named, env_tuples

from lanner.bench.common import time_ms
from lanner.kernels.attention.decode import decode_attention, decode_tile, decode_workspace, num_decode_splits

FP8 = os.environ.get("KV_DTYPE") == "fp8"

SHAPES = [  # name, query heads, seq lens
    ("w8b-b256", 32, lambda r: [r.randint(128, 512) + r.randint(0, 256) for _ in range(256)]),
    ("wnano-b256", 16, lambda r: [r.randint(100, 1024) + r.randint(0, 1024) for _ in range(256)]),
    ("b64-2k", 32, lambda r: [2048] * 64),
    ("b16-8k", 32, lambda r: [8192] * 16),
    ("b1-8k", 32, lambda r: [8192]),
]
TILES = [(bn, w, st) for bn in (32, 64, 128) for w in (2, 4, 8) for st in (2, 3, 4)]
SHAPES = env_named("SHAPES", SHAPES)
TILES = env_tuples("TILES", TILES)


def split_keys_rows(sms: int, split_keys: list[str]) -> list[dict]:
    from lanner.kernels import set_dependent_launch
    from lanner.kernels.pdl import supported

    set_dependent_launch(supported(torch.device("cuda")))
    rows = []
    for heads in (16, 32):
        for keys in (128, 192, 256, 384, 640, 1024, 2048, 4096, 8192):
            q, kc, vc, bt, sl, _ = paged_problem([keys], [1], heads, 8, 128, 16, torch.bfloat16, "cuda")
            if FP8:
                kc, vc = fp8_caches(kc, vc)
            splits = num_decode_splits(1, 8, 40960, sms)
            ref = decode_attention(q, kc, vc, bt, sl, 0.08, splits)
            # as the engine passes them: made once, so a captured call is the kernel alone
            out, workspace = torch.empty_like(q), decode_workspace(splits, heads, 128, 8, "cuda")
            times = {}
            for per in split_keys:
                least, _, one = per.partition("/")
                run = functools.partial(decode_attention, q, kc, vc, bt, sl, 0.08, splits, out=out,
                                        workspace=workspace, min_split_keys=int(least),
                                        one_split_keys=int(one or least))
                torch.testing.assert_close(run(), ref, atol=2e-2, rtol=2e-2)
                times[per] = round(time_ms(run, 20, graph=True, calls=20) * 1e3, 2)
            rows.append({"heads": heads, "keys": keys, "launch_splits": splits, "us_by_split_keys": times})
            print(heads, "heads", keys, "keys:", times, flush=True)
    return rows


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if os.environ.get("SPLIT_KEYS"):
        rows = split_keys_rows(sms, os.environ["SPLIT_KEYS"].split())
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                json.dump({"gpu": torch.cuda.get_device_name(), "kv": "fp8" if FP8 else "bf16", "batch": 1,
                           "rows": rows}, f, indent=1)
        return
    rows = []
    orders = ("as drawn", "longest first") if os.environ.get("SORTED") else ("as drawn",)
    for (name, heads, lens), order in ((shape, order) for shape in SHAPES for order in orders):
        seq_lens = lens(random.Random(0))
        if order == "longest first":
            name, seq_lens = f"{name}-sorted", sorted(seq_lens, reverse=True)
        q, kc, vc, bt, sl, _ = paged_problem(seq_lens, [1] * len(seq_lens), heads, 8, 128, 16, torch.bfloat16, "cuda")
        if FP8:
            kc, vc = fp8_caches(kc, vc)
        splits = num_decode_splits(len(seq_lens), 8, 40960, sms) * int(os.environ.get("SPLITS", "1"))
        kv_bytes = sum(seq_lens) * 8 * 128 * 2 * kc.element_size()
        ref = decode_attention(q, kc, vc, bt, sl, 0.08, splits)
        out, workspace = torch.empty_like(q), decode_workspace(len(seq_lens) * splits, heads, 128, len(seq_lens) * 8,
                                                               "cuda")
        best = None
        for tile in TILES:
            try:
                run = functools.partial(decode_attention, q, kc, vc, bt, sl, 0.08, splits, out=out,
                                        workspace=workspace, tile=tile)
                torch.testing.assert_close(run(), ref, atol=2e-2, rtol=2e-2)
                ms = time_ms(run, 5, graph=True, calls=10)
            except OutOfResources as e:  # a tile too big for shared memory (a wrong output stops the sweep)
                print(name, tile, "failed:", str(e)[:80])
                continue
            row = {"shape": name, "tile": tile, "splits": splits, "us": round(ms * 1e3, 1),
                   "tb_per_s": round(kv_bytes / ms / 1e9, 2), "default": tile == decode_tile(128, FP8, splits)}
            rows.append(row)
            if os.environ.get("TILES"):
                print(name, tile, row["us"], "us", row["tb_per_s"], "TB/s", flush=True)
            if best is None or ms < best[0]:
                best = (ms, row)
        default = next((r for r in rows if r["shape"] == name and r["default"]), best[1])
        print(f"{name}: splits {splits}, default {default['tile']} {default['us']} us {default['tb_per_s']} TB/s; "
              f"best {best[1]['tile']} {best[1]['us']} us {best[1]['tb_per_s']} TB/s", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "kv": "fp8" if FP8 else "bf16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
