# The serving workload offline (400 x 256 in, 128 out), twice with new prompts: tok/s of each burst and
# the allocator's counters over the first (issue [12]: where does the engine's host time go?).
import json, time, random
import torch
from lanner import LLM, SamplingParams
llm = LLM(model="benchmarks/configs/qwen3-8b.json", load_format="dummy", dtype="bfloat16")
rng = random.Random(0)
prompts = [[rng.randrange(10, 1000) for _ in range(256)] for _ in range(400)]
p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate([{"prompt_token_ids": x} for x in prompts[:8]], p, use_tqdm=False)
s0 = torch.cuda.memory_stats()
t = time.perf_counter(); outs = llm.generate([{"prompt_token_ids": x} for x in prompts], p, use_tqdm=False); dt = time.perf_counter() - t
s1 = torch.cuda.memory_stats()
prompts2 = [[rng.randrange(10, 1000) for _ in range(256)] for _ in range(400)]
t = time.perf_counter(); llm.generate([{"prompt_token_ids": x} for x in prompts2], p, use_tqdm=False)
print("second burst tok/s", round(400 * 128 / (time.perf_counter() - t), 1))
keys = ["num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms"]
print(json.dumps({"tok_per_s": 400 * 128 / dt, "seconds": dt, **{k: s1.get(k, 0) - s0.get(k, 0) for k in keys},
                  "reserved_gib": torch.cuda.memory_reserved() / 2**30, "allocated_gib": torch.cuda.memory_allocated() / 2**30,
                  "free_gib": torch.cuda.mem_get_info()[0] / 2**30}))
