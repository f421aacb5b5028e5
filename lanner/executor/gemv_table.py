"""Which kernel runs each small-batch weight matmul: cuBLAS, or one of the Triton GEMV's
configurations (lanner/kernels/gemv.py), measured on this GPU for every weight shape of the model
and every decode row count up to GEMV_MAX_ROWS.

Each candidate is timed in a CUDA graph of launches over distinct copies of the weight (several
hundred MiB in all, so the L2 cache holds none of them, as in a real forward), and the fastest
wins; cuBLAS keeps a shape unless a configuration beats it by MIN_GAIN. The table is measured once
per (GPU, dtype, shape) and kept in a JSON file under the cache folder, so a restart picks the same
kernels (the same numerics) without measuring again."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GEMV_MAX_ROWS = 8
ROW_BUCKETS = (1, 2, 4, 8)  # a row count runs the choice measured at the next bucket up
MIN_GAIN = 0.03  # a Triton configuration must be this much faster than cuBLAS to replace it
POOL_BYTES = 512 << 20  # weight copies a measurement cycles through (the H200's L2 is 50 MiB)
TABLE_VERSION = 2  # bump when the kernel or the candidates change: older tables are measured again

# (block_n, block_k, split_k, num_warps, num_stages): the winners of scripts/gemv_probe.py's wider
# grids (80 configurations a row count) on Qwen3-0.6B's and Qwen3-8B's shapes, H200
# (docs/benchmarks.md, 2026-12-04 16:20); one split-K configuration each for narrow shards
ONE_ROW_CANDIDATES = [(8, 512, 1, 4, 3), (16, 512, 1, 4, 3), (4, 1024, 1, 8, 3), (8, 512, 1, 8, 3),
                      (16, 512, 1, 8, 3), (4, 1024, 1, 4, 3), (16, 256, 8, 4, 3)]
ROWS_CANDIDATES = [(64, 128, 1, 4, 3), (64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4),
                   (64, 128, 8, 4, 4), (32, 128, 4, 4, 4), (32, 256, 2, 4, 3)]

def row_bucket(m: int) -> int:
    return next(b for b in ROW_BUCKETS if b >= m)


def candidates(m: int):
    from lanner.kernels.gemv import GemvConfig

    return [GemvConfig(*c) for c in (ONE_ROW_CANDIDATES if m == 1 else ROWS_CANDIDATES)]


def weight_views(n: int, k: int, dtype: torch.dtype, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Distinct [n, k] weights filling about POOL_BYTES (at least one), and the pool that holds them."""
    per = n * k
    copies = max(1, min(64, POOL_BYTES // (per * torch.finfo(dtype).bits // 8)))
    pool = torch.empty(copies * per, dtype=dtype, device=device).uniform_(-0.05, 0.05)
    return [pool[i * per:(i + 1) * per].view(n, k) for i in range(copies)], pool


def graph_us(run, views: list[torch.Tensor], launches: int = 32, repeats: int = 3) -> float:
    """Microseconds a launch of `run(weight)`, cycling through `views` inside one CUDA graph (best of
    `repeats` replays)."""
    run(views[0])  # compiles outside the capture
    torch.cuda.synchronize()
    count = max(launches, len(views))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(count):
            run(views[i % len(views)])
    graph.replay()
    best = float("inf")
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) * 1e3 / count)
    return best


def measure_shape(n: int, k: int, m: int, dtype: torch.dtype, device, configs=None) -> dict:
    """{"cublas": us, str(config): us, ...} for an [m, k] x [n, k]^T matmul on this GPU."""
    from lanner.kernels.gemv import GemvWorkspace, gemv

    views, pool = weight_views(n, k, dtype, device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    times = {"cublas": graph_us(lambda w: torch.mm(x, w.t(), out=out), views)}
    for config in candidates(m) if configs is None else configs:
        workspace = GemvWorkspace(config.workspace_floats(n), -(-n // config.block_n), device)
        times[str(config)] = graph_us(lambda w, c=config, ws=workspace: gemv(x, w, c, ws, out=out), views)
    del pool
    return times


def cache_path() -> Path:
    root = os.environ.get("LANNER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lanner")
    return Path(root) / "gemv_tables.json"


def table_key(device) -> str:
    import triton

    name = torch.cuda.get_device_name(device).replace(" ", "_")
    return f"v{TABLE_VERSION}/{name}/torch-{torch.__version__}/triton-{triton.__version__}"


class GemvTable:
    """{(n, k, row bucket, dtype): the winning config's string, or "cublas"} for one GPU, with the
    measured times kept for the record."""

    def __init__(self, device, path: Path | None = None):
        self.device = torch.device(device)
        self.path = path or cache_path()
        self.key = table_key(self.device)
        self.entries: dict[str, dict] = self._load().get(self.key, {})
        self.measured = 0

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def choice(self, n: int, k: int, m: int, dtype: torch.dtype, force: bool = False):
        """The GemvConfig to run for this shape, or None for cuBLAS; measured now if not in the table.
        `force`: the fastest configuration, even where cuBLAS is faster (None if none fits)."""
        name = f"{n}x{k}/m{row_bucket(m)}/{str(dtype).removeprefix('torch.')}"
        if name not in self.entries:
            times = measure_shape(n, k, row_bucket(m), dtype, self.device)
            best = min(times, key=times.get)
            if best != "cublas" and times[best] > (1 - MIN_GAIN) * times["cublas"]:
                best = "cublas"
            self.entries[name] = {"choice": best, "us": {c: round(t, 2) for c, t in times.items()}}
            self.measured += 1
        entry = self.entries[name]
        best = entry["choice"]
        if force:
            fitting = [c for c in entry["us"] if c != "cublas"]
            best = min(fitting, key=entry["us"].get) if fitting else "cublas"
        return next((c for c in candidates(m) if str(c) == best), None)

    def save(self) -> None:
        if not self.measured:
            return
        everything = self._load()
        everything[self.key] = {**everything.get(self.key, {}), **self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as e:  # a read-only home: measured again next time
            logger.warning("could not save the GEMV table to %s: %s", self.path, e)


def assign_gemv_kernels(model: torch.nn.Module, dtype: torch.dtype, device, force: bool = False,
                        table: GemvTable | None = None) -> dict:
    """Measure (or look up) every small-batch matmul of `model` and point its layers at the winners
    (`layer.gemv`: {rows: config}; the shared split-K workspace); `force`: the fastest Triton
    configuration everywhere one fits. Returns a summary for the record."""
    from lanner.kernels.gemv import GemvWorkspace

    start = time.perf_counter()
    table = table or GemvTable(device)
    layers = [mod for mod in model.modules() if hasattr(mod, "gemv") and mod.weight.dtype == dtype]
    chosen: dict[str, str] = {}
    floats = blocks = 0
    for layer in layers:
        n, k = layer.weight.shape
        picks = {}
        for m in range(1, GEMV_MAX_ROWS + 1):
            config = table.choice(n, k, m, dtype, force)
            if config is not None:
                picks[m] = config
                floats = max(floats, config.workspace_floats(n))
                blocks = max(blocks, -(-n // config.block_n))
            chosen[f"{n}x{k}/m{row_bucket(m)}"] = str(config) if config else "cublas"
        layer.gemv = picks
    table.save()
    workspace = GemvWorkspace(floats, blocks, device)
    for layer in layers:
        layer.gemv_workspace = workspace
    torch.cuda.empty_cache()
    seconds = time.perf_counter() - start
    logger.info("GEMV kernels for %d layers in %.1f s (%d shapes measured): %s", len(layers), seconds,
                table.measured, chosen)
    return {"seconds": round(seconds, 2), "measured": table.measured, "choices": chosen}

