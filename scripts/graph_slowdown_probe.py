"""Where one prompt step's GPU time goes, and whether kernels run slower inside the whole-forward
graph than inside the pieces (issue [12]; they do not: docs/benchmarks.md, 2026-12-04 09:35).
Times the step's forward, by CUDA events and per kernel name (profiler), four ways:
  whole        the whole-forward graph
  pieces       the piece graphs with attention launched between them
  whole-noattn a graph of the whole forward with attention skipped (captured here)
  pieces-noattn the piece graphs replayed back to back, attention skipped
and the whole graph again with the GPU idle between replays (clock or power effects), with the
SM clock and power sampled by nvidia-smi alongside.
Usage: python scripts/graph_slowdown_probe.py [--config ...] [--tokens 512]"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lanner import LLM
from lanner.core.request import SamplingParams
from lanner.layers.attention import forward_context


def events_ms(fn, reps: int = 20, gap_s: float = 0.0) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if gap_s:
            torch.cuda.synchronize()
            time.sleep(gap_s)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in times)
    return round(ms[len(ms) // 2], 4)


def kernels_by_name(fn, reps: int = 10) -> dict[str, list]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0)
        if us and e.device_type == torch.autograd.DeviceType.CUDA:
            rows[e.key[:110]] = [e.count // reps, round(us / reps, 2)]
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="benchmarks/configs/qwen3-0.6b.json")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    llm = LLM(model=args.config, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.5,
              overlap_scheduling=False, max_num_batched_tokens=2048)
    engine = llm.engine
    runner, pw = engine.runner, engine.runner.piecewise
    engine.add_request("p", list(range(1, args.tokens + 1)), SamplingParams(temperature=0, max_tokens=1,
                                                                             ignore_eos=True))
    engine.step()  # plans the backend for a real prompt step; the replays below reuse that plan
    size = pw.padded_size(args.tokens)
    bufs, model = pw.bufs.rows(size), runner.model
    ids, pos = runner.input_ids[:size], runner.positions[:size]
    pieces = pw.graphs[size]

    def run_pieces(attend: bool):
        def fn():
            with forward_context(runner.backend):
                for j in range(model.num_pieces):
                    pieces[j].replay()
                    if attend and j < model.spec.num_layers:
                        model.attend(j, bufs)
        return fn

    real_attend = model.attend
    model.attend = lambda j, b: None
    try:
        noattn = torch.cuda.CUDAGraph()
        with torch.cuda.graph(noattn, pool=pw.pool):
            model.forward_pieces(ids, pos, bufs)
    finally:
        model.attend = real_attend
    ways = {"whole": pw.full_graphs[size].replay, "pieces": run_pieces(True),
            "whole-noattn": noattn.replay, "pieces-noattn": run_pieces(False)}
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                            "--format=csv,noheader", "-lms", "50"], stdout=subprocess.PIPE, text=True)
    report = {"config": args.config, "tokens": args.tokens, "size": size, "events_ms": {}, "kernels_us": {}}
    for name, fn in ways.items():
        report["events_ms"][name] = events_ms(fn)
        report["kernels_us"][name] = kernels_by_name(fn)
        print(name, report["events_ms"][name], "kernel sum us",
              round(sum(v[1] for v in report["kernels_us"][name].values()), 1), flush=True)
    report["events_ms"]["whole, 5 ms idle before each"] = events_ms(ways["whole"], gap_s=0.005)
    report["events_ms"]["whole, 200 back to back"] = round(events_ms(lambda: [ways["whole"]() for _ in range(10)])
                                                            / 10, 4)
    smi.terminate()
    report["nvidia_smi_samples"] = smi.communicate()[0].strip().splitlines()[-40:]
    print(json.dumps(report["events_ms"], indent=1))
    for name in ways:
        print(name, json.dumps(dict(list(report["kernels_us"][name].items())[:14]), indent=0))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"graph-slowdown-{args.tokens}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
