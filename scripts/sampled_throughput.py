"""Offline throughput of a fixed workload under the sampling that served models' generation_configs
ask for, beside greedy, through the LLM API (so an older tree runs it too: run it from inside that
tree with PYTHONPATH=.). Issue [12]'s goals are measured greedy with no tokenizer; a served model's
requests sample, ask for logprobs, and are detokenized. The prefix cache is emptied before each preset, so each one
prefills its prompts (results of 2026-12-05a and earlier lack this: their later presets skipped prefill).
Usage: python scripts/sampled_throughput.py [--config benchmarks/configs/qwen3-8b.json] [--workload W-8B]
Prints a JSON line a preset (output tok/s, wall seconds)."""
from __future__ import annotations

import argparse
import json
import time

import torch

from lanner import LLM
from lanner.bench.common import WORKLOADS, Workload
from lanner.core.request import SamplingParams

PRESETS = {
    "greedy": {"temperature": 0.0},
    "qwen3": {"temperature": 0.6, "top_k": 20, "top_p": 0.95},  # Qwen3's generation_config
    "llama3": {"temperature": 0.6, "top_p": 0.9},  # Llama 3's: top-p without top-k
    "qwen2.5": {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
    "greedy+logprobs5": {"temperature": 0.0, "logprobs": 5},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="a model config (dummy weights); the embedded model if omitted")
    ap.add_argument("--workload", default="W-8B", choices=sorted(WORKLOADS))
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = ap.parse_args()
    kw = {"model": args.config, "load_format": "dummy"} if args.config else {}
    if torch.cuda.is_available():
        kw |= {"dtype": "bfloat16"}
    llm = LLM(**kw)
    base = WORKLOADS[args.workload]
    workload = Workload(args.num_prompts or base.num_prompts, base.input_len, base.output_len, base.seed)
    reqs = workload.requests(llm.engine.vocab_size)
    for name in args.presets:
        preset = PRESETS[name]
        llm.generate([[1] * 16], SamplingParams(max_tokens=4, **preset), use_tqdm=False)  # warm-up
        params = [SamplingParams(max_tokens=m, ignore_eos=True, seed=i, **preset) for i, (_, m) in enumerate(reqs)]
        # every preset runs the same prompts: without this reset all but the first would skip their prefill
        assert llm.reset_prefix_cache(), "requests still hold KV blocks"
        start = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"preset": name, "sampling": preset, "workload": args.workload, "config": args.config,
                          "output_tokens": tokens, "wall_s": round(seconds, 2),
                          "output_tok_per_s": round(tokens / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
