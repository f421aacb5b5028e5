"""Host cost of tensor-parallel step plans (docs/parallel.md): rank 0 building and pickling a
decode step's plan for 256 requests of 1,000 tokens and 63 KV blocks, and another rank applying it."""
import pickle
import time

from lanner.core.request import Request, SamplingParams
from lanner.core.schedule import SchedulerOutput
from lanner.executor.worker import Mirror, Ranks

reqs = []
for i in range(256):
    r = Request(f"r{i}", None, list(range(1000)), SamplingParams(max_tokens=512), {2}, i)
    r.block_ids = list(range(i * 70, i * 70 + 63))
    r.num_computed_tokens = 1000
    reqs.append(r)
ranks, mirror = Ranks([]), Mirror()
sched = SchedulerOutput([(r, 1) for r in reqs])
mirror.apply(pickle.loads(pickle.dumps(ranks.plan(sched))))  # the first plan carries the requests whole
times = []
for step in range(50):
    for r in reqs:
        r.all_token_ids.append(5)
        r.output_token_ids.append(5)
        r.num_computed_tokens += 1
        if step % 16 == 0:
            r.block_ids.append(99999)
    start = time.perf_counter()
    data = pickle.dumps(ranks.plan(sched))
    sent = time.perf_counter()
    mirror.apply(pickle.loads(data))
    times.append((sent - start, time.perf_counter() - sent))
plan_ms = 1000 * sum(a for a, _ in times) / len(times)
apply_ms = 1000 * sum(b for _, b in times) / len(times)
print(f"rank 0 plan+pickle {plan_ms:.2f} ms, other ranks unpickle+apply {apply_ms:.2f} ms, {len(data)} bytes")
