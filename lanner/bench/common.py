"""What every benchmark shares: workloads of random token ids, the hardware
description, timing, and writing the JSON record (and a plot)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Workload:
    num_prompts: int
    input_len: tuple[int, int]  # uniform in [lo, hi]
    output_len: tuple[int, int]
    seed: int = 0

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """(prompt token ids, output length) per request; the same for a given seed on any machine."""
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = self.input_len
        in_lens = torch.randint(lo, hi + 1, (self.num_prompts,), generator=g).tolist()
        lo, hi = self.output_len
        out_lens = torch.randint(lo, hi + 1, (self.num_prompts,), generator=g).tolist()
        return [(torch.randint(0, vocab_size, (n,), generator=g).tolist(), m) for n, m in zip(in_lens, out_lens)]


WORKLOADS = {
    "bs1": Workload(1, (128, 128), (256, 256)),
    "W-8B": Workload(256, (128, 512), (256, 256)),
    "W-nano": Workload(256, (100, 1024), (100, 1024)),
}


def time_ms(fn, repeats: int, graph: bool = False, calls: int = 1) -> float:
    """Mean ms of fn() after one warm-up call (which compiles); with `graph`, of CUDA graph replays,
    each graph holding `calls` calls (many, for kernels of a few microseconds: a replay's own launch
    gap is then spread over them)."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        fn = g.replay
        fn()
    else:
        calls = 1
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / (repeats * calls)


def hardware() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def record(kind: str, model_config: dict, workload: dict, results: dict, engine_config: dict | None = None,
           baseline: dict | None = None) -> dict:
    return {
        "benchmark": kind,
        "date": datetime.date.today().isoformat(),
        "gpu": hardware()["gpu"],
        "hardware": hardware(),
        "command": " ".join(["lanner"] + sys.argv[1:]),
        "model_config": model_config,
        "engine_config": engine_config,
        "workload": workload,
        "results": results,
        "baseline": baseline,
    }


def emit(rec: dict, output_json: str | None) -> None:
    text = json.dumps(rec, indent=1, default=str)
    print(text)
    if output_json:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w") as f:
            f.write(text + "\n")


def model_summary(hf_config) -> dict:
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {k: getattr(hf_config, k, None) for k in keys}


def workload_dict(w: Workload) -> dict:
    return asdict(w)
