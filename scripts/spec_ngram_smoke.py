"""A first measurement of n-gram speculation (not yet a `lanner bench` workload): lanner-tiny,
greedy, prompts that repeat themselves (code with recurring lines), batch 1 and 8, the same engine
options with and without `speculative_config`; prints one JSON line per run.
Usage: python scripts/spec_ngram_smoke.py [--dtype bfloat16] [--k 4]"""
import argparse
import gc
import json
import time

import torch

from lanner import LLM, SamplingParams

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
           "import os\nimport sys\nimport os\nimport sys\n", "class A:\n    pass\n\n\nclass B:\n    pass\n\n\nclass",
           "for i in range(10):\n    print(i)\nfor i in range(10):\n", "x = [1, 2, 3]\ny = [1, 2, 3]\nz = ["]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 3}
    for config in (None, spec):
        llm = LLM(dtype=args.dtype, speculative_config=config, gpu_memory_utilization=0.3)
        llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up
        for batch in (1, 8):
            prompts = (PROMPTS * 2)[:batch]
            if llm.engine.speculator is not None:
                llm.engine.speculator.stats.__init__(accepted_at=[0] * args.k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            secs = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            stats = llm.engine.speculator.stats if llm.engine.speculator else None
            print(json.dumps({"speculative_config": config, "batch": batch, "dtype": str(llm.engine.dtype),
                              "device": str(llm.engine.device), "output_tokens": tokens, "seconds": round(secs, 3),
                              "tok_per_s": round(tokens / secs, 1),
                              "mean_acceptance_length": round(stats.mean_acceptance_length, 2) if stats else None,
                              "accepted_at": stats.accepted_at if stats else None}), flush=True)
        del llm, outs
        gc.collect()  # the next engine's memory budget must not count this one
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
