"""Search the Triton GEMV's configurations against cuBLAS on this GPU, for every weight matmul of the
given model configs at decode row counts (lanner/kernels/gemv.py, lanner/executor/gemv_table.py).

  python scripts/gemv_probe.py OUT.json benchmarks/configs/qwen3-0.6b.json benchmarks/configs/qwen3-8b.json
  ROWS="1 2 4 8" GRID=wide|runtime (default wide: the search; runtime: the engine's candidates only)
  PDL=0 (launches without dependent launch; default with it, as the engine runs on Hopper)
  STAGES="3 4" (the wide grid's pipeline depths at one row; default 3)  LAYERS="qkv o" (default all)
  KINDS=1: each layer's input as the engine's decoder feeds it (q/k/v and gate/up after an RMSNorm, down
  after silu * up: the fused GEMV and "unfused <config>" both timed), not a plain x

Prints a line per (shape, rows): cuBLAS and the best configuration in us and GB/s of weight read."""
import itertools
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_env import layer_gemm_shapes

from lanner.executor.gemv_table import candidates, measure_shape
from lanner.kernels import set_dependent_launch
from lanner.kernels.gemv import GemvConfig


def model_shapes(path: str) -> dict[str, tuple[int, int]]:
    with open(path) as f:
        cfg = types.SimpleNamespace(**json.load(f))
    return layer_gemm_shapes(cfg, lm_head=True)


ENGINE_KINDS = {"qkv": "normed", "gate_up": "normed", "down": "gated"}  # models/llama.py's input_kind


def wide_grid(m: int) -> list[GemvConfig]:
    if m == 1:
        tiles = [(2, 2048), (4, 1024), (4, 2048), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 128)]
        stages = [int(s) for s in os.environ.get("STAGES", "3").split()]
        return [GemvConfig(n, k, s, w, st)
                for (n, k), s, w, st in itertools.product(tiles, (1, 2, 4, 8), (4, 8), stages)]
    tiles = [(16, 128), (16, 256), (32, 128), (32, 256), (64, 128)]
    return [GemvConfig(n, k, s, 4, st) for (n, k), s, st in itertools.product(tiles, (1, 2, 4, 8), (3, 4))]


def main() -> None:
    out_path, configs = sys.argv[1], sys.argv[2:]
    rows = [int(r) for r in os.environ.get("ROWS", "1 2 4 8").split()]
    runtime = os.environ.get("GRID", "wide") == "runtime"
    set_dependent_launch(os.environ.get("PDL", "1") == "1" and torch.cuda.get_device_capability()[0] >= 9)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for path in configs:
        name = os.path.basename(path).removesuffix(".json")
        for layer, (n, k) in model_shapes(path).items():
            if os.environ.get("LAYERS") and layer not in os.environ["LAYERS"].split():
                continue
            for m in rows:
                grid = candidates(m) if runtime else wide_grid(m)
                kind = ENGINE_KINDS.get(layer, "plain") if os.environ.get("KINDS") == "1" else "plain"
                times = measure_shape(n, k, m, torch.bfloat16, "cuda", grid, kind)
                best = min((c for c in times if c != "cublas"), key=times.get)
                gbs = lambda us, b=n * k * 2: b / us / 1e3
                top = sorted((c for c in times if c != "cublas"), key=times.get)[:5]
                results["shapes"][f"{name}/{layer}/{n}x{k}/m{m}/{kind}"] = {
                    "cublas_us": round(times["cublas"], 2), "best": best, "best_us": round(times[best], 2),
                    "speedup": round(times["cublas"] / times[best], 3), "top5": {c: round(times[c], 2) for c in top}}
                print(f"{name:12s} {layer:8s} {kind:6s} {n:6d}x{k:<6d} m={m}: cublas {times['cublas']:7.2f} us "
                      f"({gbs(times['cublas']):5.0f} GB/s)  best {times[best]:7.2f} us ({gbs(times[best]):5.0f} GB/s) "
                      f"{best}  x{times['cublas'] / times[best]:.2f}", flush=True)
                with open(out_path, "w") as f:  # so far, if the run is cut short
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
