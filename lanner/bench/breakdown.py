"""Where an offline throughput run's time goes (`lanner bench throughput --breakdown`).

Two more runs of the workload's shape after the timed one, each with fresh prompts (the same
ones again would come from the prefix cache). The first times every step on the GPU
(CUDA events) and sorts the steps into decode-only and steps with prompt tokens (prefill or
mixed: a row of more than one token): their GPU time, and the wall time the GPU spent waiting
for the host (the rest). The second runs under torch.profiler and sums the kernels' GPU time by
kind (GEMMs, prefill attention, decode attention, ...). The profiler slows the host down, so only
its kernel times are reported, not its wall time.
"""
from __future__ import annotations

import dataclasses
import re
import time

import torch

from lanner.executor.step_handle import StepTimes

# the first pattern a kernel's name matches names its kind
KERNEL_KINDS = [
    ("attention_prefill", r"_prefill_kernel"),
    ("attention_decode", r"_decode_split_kernel"),
    ("kv_store", r"store_kv"),
    ("moe", r"_moe_|_route_kernel|_combine_kernel|_count_kernel|_offsets_kernel|_scatter_kernel|_masked_small"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|xmma|cublas|splitK|sm\d+_"),
    ("norm_rope_act", r"_rms_norm|_qk_norm_rope|_silu_and_mul"),
    ("sampling", r"_race_kernel|sort|topk|softmax|argmax|cumsum|scan"),
]

STEP_RANGES = {"prepare", "model", "sample", "draft"}  # the runner's record_function names


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name)), "other")


def breakdown(llm, workload, params) -> dict:
    """`workload`: a bench Workload; `params(max_tokens)`: the SamplingParams of a request."""
    runs = []
    for seed in (workload.seed + 1, workload.seed + 2):
        reqs = dataclasses.replace(workload, seed=seed).requests(llm.engine.vocab_size)
        runs.append(([p for p, _ in reqs], [params(m) for _, m in reqs]))
    return {"steps": _step_split(llm, *runs[0]), **_kernel_split(llm, *runs[1])}


def _step_split(llm, prompts: list, params: list) -> dict:
    runner = llm.engine.runner
    kinds: list[bool] = []  # per launched step: a row of more than one token (prompt tokens)
    launch = runner.launch

    def launch_and_note(sched, *args, **kw):
        kinds.append(any(n > 1 for _, n in sched.scheduled))
        return launch(sched, *args, **kw)

    runner.launch, runner.step_times = launch_and_note, StepTimes(each=[])
    try:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall_ms = (time.perf_counter() - start) * 1e3
        each = runner.step_times.each
    finally:
        del runner.launch  # the bound method again
        runner.step_times = None
    out = {"wall_ms": round(wall_ms, 1)}
    for name, want in (("prompt", True), ("decode", False)):
        ms = [sum(t) for t, k in zip(each, kinds) if k is want]
        out[f"{name}_steps"] = len(ms)
        out[f"{name}_gpu_ms"] = round(sum(ms), 1)
    out["gpu_idle_ms"] = round(wall_ms - out["prompt_gpu_ms"] - out["decode_gpu_ms"], 1)
    return out


def _kernel_split(llm, prompts: list, params: list) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    return kernel_times(prof)


def kernel_times(prof, per: int = 1) -> dict:
    """A finished torch.profiler run's GPU kernel time by kind, and its largest unclassified
    kernels, in milliseconds (divided by `per`: steps, say)."""
    totals: dict[str, float] = {}
    others: dict[str, float] = {}
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False) or event.key in STEP_RANGES:
            continue  # a record_function range on the GPU's timeline (kernels inside it count on their own)
        us = getattr(event, "self_device_time_total", None)
        if us is None:  # torch before the device_time names
            us = event.self_cuda_time_total
        if us and event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kernel_kind(event.key)
            totals[kind] = totals.get(kind, 0.0) + us / 1e3 / per
            if kind == "other":
                others[event.key[:120]] = us / 1e3 / per
    top = sorted(others.items(), key=lambda kv: -kv[1])[:12]
    digits = 1 if per == 1 else 3
    return {"kernels_ms": {kind: round(ms, digits) for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1])},
            "other_kernels_ms": {name: round(ms, digits) for name, ms in top}}
