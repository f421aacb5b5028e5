"""GPU time of one speculative step's parts on a model shape with dummy weights (issue [8]):
the target's decode graph at 1 row and at k+1 rows, the draft's first pass (k+1 rows), its k-1
decode steps and its KV-only pass, each replayed alone; then the kernels of each under the
profiler. Usage: python scripts/profile_draft.py [--batch 1] [--k 4] [--out DIR]"""
from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from lanner import LLM
from lanner.bench.common import time_ms
from lanner.core.request import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--config", default="benchmarks/configs/qwen3-8b.json")
    ap.add_argument("--head-config", default="benchmarks/configs/qwen3-8b-eagle3.json")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    llm = LLM(model=args.config, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.85,
              max_num_seqs=max(8, args.batch), max_model_len=2048,
              speculative_config={"method": "eagle3", "num_speculative_tokens": args.k, "model": args.head_config,
                                  "adaptive": False})
    prompts = [{"prompt_token_ids": list(range(100 + i, 228 + i))} for i in range(args.batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    runner, drafter = llm.engine.runner, llm.engine.runner.drafter
    b, rows = args.batch, args.batch * (args.k + 1)
    parts = {
        f"target decode graph, {b} rows": lambda: runner.graphs.replay_graph(runner.graphs.padded_size(b)),
        f"target verify graph, {rows} rows": lambda: runner.graphs.replay_graph(runner.graphs.padded_size(rows)),
        f"draft first pass, {rows} rows": lambda: drafter.first_pass_graphs.replay_graph(
            drafter.first_pass_graphs.padded_size(rows)),
        f"draft KV fill, {b} rows": lambda: drafter.kv_fill_graphs.replay_graph(drafter.kv_fill_graphs.padded_size(b)),
        f"draft {args.k - 1} decode steps, batch {b}": lambda: drafter.graphs.replay_graph(drafter.graphs.padded_size(b)),
    }
    os.makedirs(args.out, exist_ok=True)
    lines = [f"{name}: {time_ms(fn, 50):.3f} ms" for name, fn in parts.items()]
    print("\n".join(lines), flush=True)
    for name, fn in parts.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        lines += ["", f"== {name} (10 replays)", prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)]
    with open(os.path.join(args.out, f"profile-draft-b{b}-k{args.k}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
