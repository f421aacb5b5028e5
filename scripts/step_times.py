"""Per-step GPU time (target forward + sampling, and the drafter's work) of one batch on a model
shape with dummy weights, without and with an EAGLE-3 head whose drafts (random weights) are
all rejected: where the cost of speculation at acceptance 0 goes, step by step (issue [8]).
Usage: python scripts/step_times.py [--batch 64] [--output-len 64]"""
from __future__ import annotations

import argparse
import json
import os

from lanner import LLM
from lanner.core.request import SamplingParams
from lanner.executor.step_handle import StepTimes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    prompts = [{"prompt_token_ids": list(range(100 + i, 228 + i))} for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    result = {}
    for name, spec in [("plain", None), ("eagle3", {"method": "eagle3", "num_speculative_tokens": 4,
                                                    "model": "benchmarks/configs/qwen3-8b-eagle3.json"})]:
        llm = LLM(model="benchmarks/configs/qwen3-8b.json", load_format="dummy", dtype="bfloat16",
                  gpu_memory_utilization=0.85, max_num_seqs=args.batch, max_model_len=2048, speculative_config=spec)
        llm.generate(prompts, params, use_tqdm=False)
        for _ in range(2):
            llm.engine.runner.step_times = times = StepTimes(each=[])
            if llm.engine.speculator is not None:
                llm.engine.speculator.stats.__init__(accepted_at=[0] * 4)
            llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.speculator.stats.as_dict() if llm.engine.speculator else None
        result[name] = {"steps": times.each, "stats": stats}
        print(name, "target ms", round(times.target_ms, 1), "draft ms", round(times.draft_ms, 1), stats, flush=True)
        del llm
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"step-times-b{args.batch}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
