# cuBLAS bf16 GEMMs of a model's layers at prompt-step and decode row counts, timed in CUDA graphs, with
# the SM clock and power read while a long loop runs (issue [12]: W-8B's GEMMs run ~610 TFLOP/s over
# the run; is that cuBLAS's ceiling on these shapes, or the clock under sustained load?).
# CFG (default benchmarks/configs/qwen3-8b.json), ROWS (default "8192 2048 512 256"), LIBS ("cublas cublaslt").
import json
import os
import subprocess
import threading
import time

import torch
from probe_env import layer_gemm_shapes
from transformers import AutoConfig

from lanner.bench.common import time_ms

cfg = AutoConfig.from_pretrained(os.environ.get("CFG", "benchmarks/configs/qwen3-8b.json"))
shapes = layer_gemm_shapes(cfg)
rows = [int(m) for m in os.environ.get("ROWS", "8192 2048 512 256").split()]


def smi() -> list[str]:
    q = "clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False).stdout.strip().splitlines()


def layer_ms(m: int) -> dict:
    ws = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) / 64 for k, (n, kk) in shapes.items()}
    xs = {k: torch.randn(m, kk, device="cuda", dtype=torch.bfloat16) for k, (n, kk) in shapes.items()}
    out = {}
    for k, w in ws.items():
        ms = time_ms(lambda x=xs[k], w=w: torch.nn.functional.linear(x, w), 20, graph=True, calls=5)
        n, kk = w.shape
        out[k] = {"ms": round(ms, 4), "tflops": round(2 * m * n * kk / ms / 1e9, 1),
                  "weight_tb_s": round(n * kk * 2 / ms / 1e9, 2)}
    all_flop = sum(2 * m * n * kk for n, kk in shapes.values())
    out["layer_tflops"] = round(all_flop / sum(v["ms"] for v in out.values() if isinstance(v, dict)) / 1e9, 1)
    return out


results = {"config": cfg.name_or_path, "shapes": shapes, "gpu": torch.cuda.get_device_name()}
for lib in os.environ.get("LIBS", "cublas cublaslt").split():
    torch.backends.cuda.preferred_blas_library(lib)
    results[lib] = {m: layer_ms(m) for m in rows}
    print(lib, json.dumps({m: r["layer_tflops"] for m, r in results[lib].items()}), flush=True)
torch.backends.cuda.preferred_blas_library("cublas")

# ~10 s of the 8192-row layer back to back, the clock read every second: throttling under sustained load?
m = max(rows)
ws = [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) / 64 for n, kk in shapes.values()]
xs = [torch.randn(m, kk, device="cuda", dtype=torch.bfloat16) for n, kk in shapes.values()]
reads, stop = [], threading.Event()


def sample() -> None:
    while not stop.is_set():
        reads.append(smi())
        time.sleep(1)


threading.Thread(target=sample, daemon=True).start()
flop = sum(2 * m * w.shape[0] * w.shape[1] for w in ws)
start, iters, per_s = time.perf_counter(), 0, []
while time.perf_counter() - start < 10:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(50):
        for x, w in zip(xs, ws):
            torch.nn.functional.linear(x, w)
    e1.record()
    e1.synchronize()
    per_s.append(round(50 * flop / e0.elapsed_time(e1) / 1e9, 1))
stop.set()
results["sustained_tflops"] = per_s
results["nvidia_smi"] = reads
print(json.dumps(results, indent=1))
