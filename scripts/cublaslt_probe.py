# Every algorithm cuBLASLt's heuristic offers for a model's layer GEMMs at decode row counts, each timed
# in CUDA graphs against torch's own call (issue [12]: W-8B's decode GEMMs run ~576 TFLOP/s at 256 rows
# with cuBLAS's default choice; is a faster kernel among the ones cuBLASLt lists?). Through ctypes, over
# the libcublasLt that torch loaded. CFG (default benchmarks/configs/qwen3-8b.json), ROWS (default
# "256 128 512"), ALGOS (candidates asked of the heuristic, default 64); writes JSON to argv[1] if given.
import ctypes
import json
import os
import sys

import torch
from probe_env import layer_gemm_shapes
from transformers import AutoConfig

from lanner.bench.common import time_ms

COMPUTE_32F, R_32F, R_16BF, OP_T = 68, 0, 14, 1
DESC_TRANSA, PREF_MAX_WORKSPACE = 3, 1
CONFIG_ATTRS = {"id": 0, "tile": 1, "split_k": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6,
                "inner": 7, "cluster": 8}
WORKSPACE = 32 << 20
BEST_KEYS = ("rank", "tile", "split_k", "stages", "cluster")


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def loaded_cublaslt() -> ctypes.CDLL:
    torch.nn.functional.linear(torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16),
                               torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16))
    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if "libcublasLt.so" in line)
    return ctypes.CDLL(path)


lt = loaded_cublaslt()


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: cuBLAS status {status}")


def handle_of(kind: str, create, *args) -> ctypes.c_void_p:
    h = ctypes.c_void_p()
    check(create(ctypes.byref(h), *args), kind)
    return h


class Gemm:
    """y[m, n] = x[m, k] @ w[n, k]^T as cuBLASLt sees it (column-major): D[n, m] = op_T(W[k, n]) @ X[k, m]."""

    def __init__(self, m: int, n: int, k: int):
        self.handle = handle_of("create", lt.cublasLtCreate)
        self.desc = handle_of("desc", lt.cublasLtMatmulDescCreate, COMPUTE_32F, R_32F)
        op = ctypes.c_int32(OP_T)
        check(lt.cublasLtMatmulDescSetAttribute(self.desc, DESC_TRANSA, ctypes.byref(op), 4), "transa")
        layout = lt.cublasLtMatrixLayoutCreate
        layout.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                           ctypes.c_int64]
        self.a = handle_of("a", layout, R_16BF, k, n, k)
        self.b = handle_of("b", layout, R_16BF, k, m, k)
        self.d = handle_of("d", layout, R_16BF, n, m, n)
        self.pref = handle_of("pref", lt.cublasLtMatmulPreferenceCreate)
        ws = ctypes.c_size_t(WORKSPACE)
        check(lt.cublasLtMatmulPreferenceSetAttribute(self.pref, PREF_MAX_WORKSPACE, ctypes.byref(ws), 8), "pref")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def candidates(self, count: int) -> list[HeuristicResult]:
        results = (HeuristicResult * count)()
        returned = ctypes.c_int(0)
        check(lt.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, self.pref,
                                                count, results, ctypes.byref(returned)), "heuristic")
        return [results[i] for i in range(returned.value) if results[i].state == 0]

    def run(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, algo: Algo, workspace: torch.Tensor) -> None:
        check(lt.cublasLtMatmul(self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()),
                                self.a, ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta),
                                ctypes.c_void_p(y.data_ptr()), self.d, ctypes.c_void_p(y.data_ptr()), self.d,
                                ctypes.byref(algo), ctypes.c_void_p(workspace.data_ptr()), ctypes.c_size_t(WORKSPACE),
                                ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "matmul")


def describe(algo: Algo) -> dict:
    out = {}
    for name, attr in CONFIG_ATTRS.items():
        value, written = ctypes.c_uint64(0), ctypes.c_size_t(0)
        size = 2 if name in ("inner", "cluster") else 4
        lt.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value), size,
                                                ctypes.byref(written))
        out[name] = value.value
    return out


def probe(m: int, n: int, k: int, count: int) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
    torch_ms = time_ms(lambda: torch.nn.functional.linear(x, w), 20, graph=True, calls=5)
    expected = torch.nn.functional.linear(x, w).float()
    gemm = Gemm(m, n, k)
    algos = []
    for rank, cand in enumerate(gemm.candidates(count)):
        y.zero_()
        gemm.run(w, x, y, cand.algo, workspace)
        torch.cuda.synchronize()
        error = (y.float() - expected).abs().max().item()
        ms = time_ms(lambda c=cand: gemm.run(w, x, y, c.algo, workspace), 20, graph=True, calls=5)
        algos.append({"rank": rank, "ms": round(ms, 4), "max_abs_error": round(error, 4), "waves": round(cand.waves, 2),
                      "workspace": cand.workspace_size, **describe(cand.algo)})
    best = min(algos, key=lambda a: a["ms"]) if algos else None
    tflops = lambda ms: round(2 * m * n * k / ms / 1e9, 1)
    return {"m": m, "n": n, "k": k, "torch_ms": round(torch_ms, 4), "torch_tflops": tflops(torch_ms),
            "heuristic_first_ms": algos[0]["ms"] if algos else None, "best_ms": best and best["ms"],
            "best_tflops": best and tflops(best["ms"]), "best": best, "candidates": len(algos), "algos": algos}


cfg = AutoConfig.from_pretrained(os.environ.get("CFG", "benchmarks/configs/qwen3-8b.json"))
shapes = layer_gemm_shapes(cfg, lm_head=True)
rows = [int(m) for m in os.environ.get("ROWS", "256 128 512").split()]
count = int(os.environ.get("ALGOS", "64"))
results = {"gpu": torch.cuda.get_device_name(), "config": cfg.name_or_path, "shapes": {}}
for m in rows:
    layer_torch = layer_best = 0.0
    for name, (n, k) in shapes.items():
        r = probe(m, n, k, count)
        results["shapes"][f"{name}-m{m}"] = r
        if name != "lm_head":
            layer_torch += r["torch_ms"]
            layer_best += min(r["best_ms"] or r["torch_ms"], r["torch_ms"])
        print(f"m={m} {name} {n}x{k}: torch {r['torch_ms']} ms ({r['torch_tflops']} TFLOP/s), heuristic's first "
              f"{r['heuristic_first_ms']}, best of {r['candidates']} {r['best_ms']} ({r['best_tflops']} TFLOP/s) "
              f"{ {key: r['best'][key] for key in BEST_KEYS} if r['best'] else ''}",
              flush=True)
    print(f"m={m} layer: torch {layer_torch:.4f} ms, best per GEMM {layer_best:.4f} ms "
          f"({layer_torch / layer_best:.3f}x)", flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
