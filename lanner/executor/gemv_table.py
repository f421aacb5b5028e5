"""Which kernel runs each small-batch weight matmul: cuBLAS, or one of the Triton GEMV's
configurations (lanner/kernels/gemv.py), measured on this GPU for every weight shape of the model
and every decode row count up to GEMV_MAX_ROWS.

Each candidate is timed in a CUDA graph of launches over distinct copies of the weight (512 MiB
in all, 10x the H200's L2 cache, so it holds none of them, as in a real forward), and the fastest
wins; cuBLAS keeps a shape unless a configuration beats it by MIN_GAIN. The table is measured once
per (GPU, dtype, shape) and kept in a JSON file under the cache folder, so a restart picks the same
kernels (the same numerics) without measuring again; its key names the GPU, the torch and triton
versions and a hash of the kernel's source (with the jit helpers it calls) and the candidates, so
a change to any of them measures anew. A layer whose GEMV can take its input before another
kernel's work (`Linear.input_kind`: a gated MLP's down projection takes gate and up, the
projections after an RMSNorm take the norm's input) is measured as it runs, three ways: that
kernel (silu_and_mul, the add + RMSNorm) then cuBLAS, that kernel then each configuration
("unfused <config>"), and each configuration doing the work as it loads x (kernels/gemv.py GATED,
NORM); the fastest runs, so fusing never costs time."""
from __future__ import annotations

import hashlib
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
UNFUSED = "unfused "  # a table choice's prefix: the kernel before the GEMV runs on its own
POOL_BYTES = 512 << 20  # weight copies a measurement cycles through (the H200's L2 is 50 MiB)
MAX_COPIES = 512  # tiny weights: 512 copies of 1 MiB still overflow a 50 MiB L2 tenfold

# (block_n, block_k, split_k, num_warps, num_stages): the winners of scripts/gemv_probe.py's wider
# grids (80 configurations a row count) on Qwen3-0.6B's and Qwen3-8B's shapes, H200
# (docs/benchmarks.md, 2026-12-04 15:55-16:15), and at one row the H100's winners for Qwen3-8B's
# q/k/v and o projections as the decoder feeds them (2026-12-06 03:55-04:00: 2,048-wide tiles,
# ~4% faster there, and chosen for every 8B shape); one split-K configuration each for narrow shards
ONE_ROW_CANDIDATES = [(8, 512, 1, 4, 3), (16, 512, 1, 4, 3), (4, 1024, 1, 8, 3), (8, 512, 1, 8, 3),
                      (16, 512, 1, 8, 3), (4, 1024, 1, 4, 3), (4, 2048, 1, 4, 3), (8, 1024, 1, 4, 3),
                      (2, 2048, 1, 8, 3), (16, 256, 8, 4, 3)]
ROWS_CANDIDATES = [(64, 128, 1, 4, 3), (64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4),
                   (64, 128, 8, 4, 4), (32, 128, 4, 4, 4), (32, 256, 2, 4, 3)]


def row_bucket(m: int) -> int:
    return next(b for b in ROW_BUCKETS if b >= m)


def candidates(m: int):
    from lanner.kernels.gemv import GemvConfig

    return [GemvConfig(*c) for c in (ONE_ROW_CANDIDATES if m == 1 else ROWS_CANDIDATES)]


def weight_views(n: int, k: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Distinct [n, k] weights filling about POOL_BYTES (at least one), views of one pool."""
    per = n * k
    copies = max(1, min(MAX_COPIES, POOL_BYTES // (per * torch.finfo(dtype).bits // 8)))
    pool = torch.empty(copies * per, dtype=dtype, device=device).uniform_(-0.05, 0.05)
    return [pool[i * per:(i + 1) * per].view(n, k) for i in range(copies)]


def graph_us(run, views: list[torch.Tensor], launches: int = 16, repeats: int = 3) -> float:
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


def example_inputs(kind: str, m: int, k: int, like: torch.Tensor, fill=torch.zeros) -> tuple[torch.Tensor, dict]:
    """An input of `kind` (Linear.input_kind) for an [n, k] weight like `like`, and gemv's arguments
    for it, as the layer runs: x, then {"gated": True} or {"norm": Norm.of(weight, eps, x, residual)}."""
    from lanner.kernels.fused_reference import Norm

    x = fill(m, k * (1 + (kind == "gated")), dtype=like.dtype, device=like.device)
    if kind == "gated":
        return x, {"gated": True}
    if kind == "normed":
        weight = torch.ones(k, dtype=like.dtype, device=like.device)
        return x, {"norm": Norm.of(weight, 1e-6, x, fill(m, k, dtype=like.dtype, device=like.device))}
    return x, {}


def measure_shape(n: int, k: int, m: int, dtype: torch.dtype, device, configs=None, kind: str = "plain") -> dict:
    """{"cublas": us, str(config): us, ...} for an [m, k] x [n, k]^T matmul on this GPU, its input of
    `kind` (see the module's docstring: cuBLAS after the kernel it needs, the GEMV with it inside)."""
    from triton.runtime.errors import OutOfResources

    from lanner.kernels.fused import rms_norm, silu_and_mul
    from lanner.kernels.gemv import GemvWorkspace, gemv, takes_norm

    views = weight_views(n, k, dtype, device)  # may raise torch.cuda.OutOfMemoryError
    x, args = example_inputs(kind, m, k, views[0], fill=torch.randn)
    out = torch.empty(m, n, dtype=dtype, device=device)

    def before(x):  # what cuBLAS multiplies
        if kind == "gated":
            return silu_and_mul(x)
        return rms_norm(x, args["norm"].weight, args["norm"].eps, args["norm"].residual)[0] if kind == "normed" else x

    def time_if_it_fits(name: str, run) -> None:
        try:
            times[name] = graph_us(run, views)
        except OutOfResources as e:  # raised as it launches, before the capture: the pipeline needs more
            # shared memory than this GPU has (fp32 weights, a smaller GPU; a fused input needs more)
            logger.info("GEMV candidate %s does not fit this GPU (%s): left out", name, e)

    times = {"cublas": graph_us(lambda w: torch.mm(before(x), w.t(), out=out), views)}
    for config in candidates(m) if configs is None else configs:
        workspace = GemvWorkspace.of(config, n, m, device)
        if kind != "normed" or takes_norm(dtype, m):
            time_if_it_fits(str(config), lambda w, c=config, ws=workspace: gemv(x, w, c, ws, out, **args))
        if kind != "plain":
            time_if_it_fits(f"{UNFUSED}{config}", lambda w, c=config, ws=workspace: gemv(before(x), w, c, ws, out))
    return times


def cache_path() -> Path:
    root = os.environ.get("LANNER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lanner")
    return Path(root) / "gemv_tables.json"


def kernel_hash() -> str:
    """A hash of the candidates and of the GEMV's Triton source: its module and those of the jit
    helpers it calls (silu_mul and add_rounded in kernels/fused.py, the wait in kernels/pdl.py)."""
    from lanner.kernels import fused, gemv, pdl

    code = hashlib.sha1(repr((ONE_ROW_CANDIDATES, ROWS_CANDIDATES)).encode())
    for module in (gemv, fused, pdl):
        code.update(Path(module.__file__).read_bytes())
    return code.hexdigest()[:12]


def table_key(device) -> str:
    import triton

    from lanner.kernels import dependent_launch

    name = torch.cuda.get_device_name(device).replace(" ", "_")
    launch = "/pdl" if dependent_launch()["PDL"] else ""  # the chains of launches it times overlap with it
    return f"{name}/torch-{torch.__version__}/triton-{triton.__version__}/{kernel_hash()}{launch}"


class GemvTable:
    """{(n, k, row bucket, dtype, input kind): the winning config's string, or "cublas"} for one GPU,
    with the measured times kept for the record."""

    def __init__(self, device, path: Path | None = None):
        self.device = torch.device(device)
        self.path = path or cache_path()
        self.key = table_key(self.device)
        stored = self._load().get(self.key)
        # entries of another shape (a hand-edited or truncated file) are measured again
        self.entries: dict[str, dict] = {name: e for name, e in stored.items() if valid_entry(e)} \
            if isinstance(stored, dict) else {}
        self.measured = 0
        self.unsaved: set[str] = set()  # measurements that ran out of memory: cuBLAS, this run only

    def _load(self) -> dict:
        try:
            everything = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return everything if isinstance(everything, dict) else {}

    def choice(self, n: int, k: int, m: int, dtype: torch.dtype, force: bool = False, kind: str = "plain"):
        """The GemvConfig to run for this shape, or None for cuBLAS (`fused_choice` says whether it
        also does the input kind's work)."""
        return self.fused_choice(n, k, m, dtype, force, kind)[0]

    def fused_choice(self, n: int, k: int, m: int, dtype: torch.dtype, force: bool = False,
                     kind: str = "plain") -> tuple:
        """(The GemvConfig to run for this shape or None for cuBLAS, whether it does the input kind's
        work); measured now if not in the table. `force`: the fastest configuration, even where
        cuBLAS is faster; `kind`: the layer's input (Linear.input_kind), measured as an entry of its
        own unless plain."""
        name = f"{n}x{k}/m{row_bucket(m)}/{str(dtype).removeprefix('torch.')}" + ("" if kind == "plain" else f"/{kind}")
        if name not in self.entries:
            self.entries[name] = self._measure(name, n, k, row_bucket(m), dtype, kind)
            self.measured += 1
        entry = self.entries[name]
        best = entry["choice"]
        if force:
            configs = [c for c in entry["us"] if c != "cublas"]
            best = min(configs, key=entry["us"].get) if configs else "cublas"
        config = next((c for c in candidates(m) if str(c) == best.removeprefix(UNFUSED)), None)
        return config, config is not None and kind != "plain" and not best.startswith(UNFUSED)

    def _measure(self, name: str, n: int, k: int, rows: int, dtype: torch.dtype, kind: str) -> dict:
        try:
            times = measure_shape(n, k, rows, dtype, self.device, kind=kind)
        except torch.cuda.OutOfMemoryError:  # the weight copies did not fit next to the model
            torch.cuda.empty_cache()
            logger.warning("no memory to measure the GEMV for %s: cuBLAS", name)
            self.unsaved.add(name)
            return {"choice": "cublas", "us": {"cublas": 0.0}}
        best = min(times, key=times.get)
        if best != "cublas" and times[best] > (1 - MIN_GAIN) * times["cublas"]:
            best = "cublas"
        return {"choice": best, "us": {c: round(t, 2) for c, t in times.items()}}

    def save(self) -> None:
        if not self.measured:
            return
        everything = self._load()
        kept = everything.get(self.key)
        everything[self.key] = {**(kept if isinstance(kept, dict) else {}),
                                **{name: e for name, e in self.entries.items() if name not in self.unsaved}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as e:  # a read-only home: measured again next time
            logger.warning("could not save the GEMV table to %s: %s", self.path, e)


def valid_entry(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("us"), dict) and entry.get("choice") in entry["us"]


def assign_gemv_kernels(models: list[torch.nn.Module], dtype: torch.dtype, device, force: bool = False,
                        table: GemvTable | None = None) -> dict:
    """Measure (or look up) every small-batch matmul of `models` (a target and its drafter's network,
    which may share layers) and point their layers at the winners (`layer.gemv`: {rows: config}; one
    split-K workspace for all); `force`: the fastest Triton configuration everywhere. Returns a
    summary for the record."""
    from lanner.kernels.gemv import GemvWorkspace

    start = time.perf_counter()
    table = table or GemvTable(device)
    layers = list({id(mod): mod for model in models for mod in model.modules()
                   if hasattr(mod, "gemv") and mod.weight.dtype == dtype}.values())
    # one choice per weight shape and input kind (a decoder repeats each once a layer):
    # {(n, k, kind): ({rows: config}, the rows whose GEMV does the kind's work)}
    kind = {id(layer): (*layer.weight.shape, getattr(layer, "input_kind", "plain")) for layer in layers}
    picks = {key: ({}, set()) for key in dict.fromkeys(kind.values())}
    chosen: dict[str, str] = {}
    for (n, k, input_kind), (rows, fused) in picks.items():
        for m in range(1, GEMV_MAX_ROWS + 1):
            config, fuses = table.fused_choice(n, k, m, dtype, force, input_kind)
            if config is not None:
                rows[m] = config
            if fuses:
                fused.add(m)
            suffix = "" if input_kind == "plain" else f"/{input_kind}"
            chosen[f"{n}x{k}/m{row_bucket(m)}{suffix}"] = \
                "cublas" if config is None else f"{'' if fuses or input_kind == 'plain' else UNFUSED}{config}"
    table.save()
    sized = [(config, n, m) for (n, _, _), (rows, _) in picks.items() for m, config in rows.items()]
    workspace = GemvWorkspace(max((c.workspace_floats(n, m) for c, n, m in sized), default=0),
                              max((c.blocks(n) for c, n, _ in sized), default=0), device)
    for layer in layers:
        (layer.gemv, fused), layer.gemv_workspace = picks[kind[id(layer)]], workspace
        layer.fused_rows = frozenset(fused)
    load_kernels({kind[id(layer)]: layer.weight for layer in layers}, picks, workspace)
    torch.cuda.empty_cache()
    seconds = time.perf_counter() - start
    logger.info("GEMV kernels for %d layers in %.1f s (%d shapes measured): %s", len(layers), seconds,
                table.measured, chosen)
    return {"seconds": round(seconds, 2), "measured": table.measured, "choices": chosen}


def load_kernels(weights: dict[tuple[int, int, str], torch.Tensor], picks: dict[tuple[int, int, str], tuple],
                 workspace) -> None:
    """Launch each chosen kernel once, outside any capture: a kernel that first launches inside a
    CUDA graph capture loads its module there, which the driver refuses (a table read from the
    cache file measured nothing, so nothing was launched yet). Keys: (n, k, input kind); a fused
    kind is a compilation of its own, and a normed input two (with a residual, and the first
    layer's without)."""
    from lanner.kernels.gemv import block_rows, gemv

    for (n, k, kind), (rows, fused) in picks.items():
        weight = weights[n, k, kind]  # a layer's own: a weight of that shape, where the real launches read
        first_rows: dict = {}  # (config, one row or several, fused): the fewest rows that run it
        for m, config in rows.items():
            first_rows.setdefault((config, block_rows(m), m in fused), m)
        for (config, _, fuses), m in first_rows.items():
            x, args = example_inputs(kind if fuses else "plain", m, k, weight)
            gemv(x, weight, config, workspace, **args)
            if "norm" in args:
                gemv(x, weight, config, workspace, norm=args["norm"]._replace(residual=None))
    if weights and next(iter(weights.values())).is_cuda:
        torch.cuda.synchronize()
