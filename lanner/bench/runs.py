"""`lanner bench latency`, `step` and `throughput`: run a fixed workload through
the offline engine, optionally with transformers on the same workload first."""
from __future__ import annotations

import argparse
import statistics

import torch

from lanner.bench import common, hf_baseline
from lanner.bench.common import Workload, timed
from lanner.bench.steps import BACK_TO_BACK_RUNS, BACK_TO_BACK_STEPS, NUM_DECODES, step_times
from lanner.core.heap import frozen_heap
from lanner.core.request import SamplingParams


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logprobs")


def _sampling(args: argparse.Namespace):
    """The workload's SamplingParams of a request of m output tokens, and what the JSON records:
    greedy unless a sampling flag is given (what a served model's generation_config asks for:
    Qwen3 temperature 0.6, top_k 20, top_p 0.95; Qwen2.5 repetition_penalty 1.05), each request
    seeded by its index. Without --temperature, top-k/top-p/min-p sample at temperature 1 and
    penalties or logprobs alone stay greedy."""
    given = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    if not given:
        return _greedy, {"greedy": True}
    given.setdefault("temperature", 1.0 if given.keys() & {"top_k", "top_p", "min_p"} else 0.0)
    seeds = iter(range(1 << 62))
    return (lambda m: SamplingParams(max_tokens=m, ignore_eos=True, seed=next(seeds), **given)), {"sampling": given}


def _engine_facts(llm) -> dict:
    runner = llm.engine.runner
    facts = {"kv_blocks": runner.num_blocks, "kv_tokens": runner.num_blocks * runner.block_size,
             "dtype": str(runner.dtype), "device": str(runner.device),
             "attention_backend": type(runner.backend).__name__}
    if runner.piecewise is not None and runner.piecewise.report is not None:
        rep = runner.piecewise.report
        facts.update(piecewise_sizes=rep.sizes, piecewise_pieces=rep.num_pieces,
                     piecewise_warmup_s=round(rep.warmup_s, 2), piecewise_capture_s=round(rep.capture_s, 2),
                     piecewise_pool_mib=round(rep.pool_bytes / 2**20, 1),
                     whole_forward_sizes=runner.piecewise.full_sizes,
                     whole_forward_capture_s=round(runner.piecewise.full_capture_s, 2),
                     whole_forward_pool_growth_mib=round(runner.piecewise.full_pool_growth / 2**20, 1))
    if runner.graphs is not None and runner.graphs.report is not None:
        rep = runner.graphs.report
        facts.update(graph_capture_s=round(rep.seconds, 2), graph_pool_mib=round(rep.pool_bytes / 2**20, 1),
                     graph_pool_growth_mib=round(runner.graphs.pool_growth / 2**20, 1), graph_sizes=rep.sizes)
    if runner.gemv_report is not None:
        facts["gemv"] = runner.gemv_report
    if llm.engine.speculator is not None:  # totals over the whole run, warm-up included
        facts.update(llm.engine.speculator.stats.as_dict())
    if torch.cuda.is_available():
        facts["gpu_memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return facts


def latency(llm, input_len: int, output_len: int, batch_sizes: list[int]) -> list[dict]:
    vocab = llm.engine.vocab_size
    llm.generate([[1] * 16], _greedy(4), use_tqdm=False)  # warm-up
    rows = []
    for bs in batch_sizes:
        prompts = [p for p, _ in Workload(bs, (input_len, input_len), (output_len, output_len), seed=bs)
                   .requests(vocab)]
        outs, secs = timed(lambda: llm.generate(prompts, _greedy(output_len), use_tqdm=False))
        ttft = statistics.mean(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)
        decode = statistics.mean((o.metrics.finished_time - o.metrics.first_token_time) / (output_len - 1)
                                 for o in outs)
        rows.append({"batch_size": bs, "wall_s": round(secs, 3), "ttft_ms": round(ttft * 1e3, 2),
                     "ms_per_token": round(decode * 1e3, 3), "tok_per_s_per_seq": round(1 / decode, 1),
                     "output_tok_per_s": round(bs * output_len / secs, 1)})
        print(rows[-1], flush=True)
    return rows


def throughput(llm, workload: Workload, params=_greedy) -> dict:
    """`params(m)`: a request's SamplingParams for m output tokens."""
    reqs = workload.requests(llm.engine.vocab_size)
    llm.generate([[1] * 16], params(4), use_tqdm=False)  # warm-up
    steps, computed = llm.engine.num_steps, llm.engine.num_tokens_computed
    outs, secs = timed(lambda: llm.generate([p for p, _ in reqs], [params(m) for _, m in reqs], use_tqdm=False))
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in reqs)
    # steps and tokens through the model: a server's lanner_engine_steps / _tokens_computed over the
    # same workload compare with these (the mean batch of its steps)
    return {"wall_s": round(secs, 2), "output_tokens": out_tokens, "input_tokens": in_tokens,
            "output_tok_per_s": round(out_tokens / secs, 1), "total_tok_per_s": round((out_tokens + in_tokens) / secs, 1),
            "requests_per_s": round(len(reqs) / secs, 2), "preemptions": llm.engine.scheduler.num_preemptions,
            "steps": llm.engine.num_steps - steps, "tokens_computed": llm.engine.num_tokens_computed - computed}


def profile_decode(llm, input_len: int, path: str, steps: int = 32) -> None:
    """torch.profiler over a batch-1 generation: where each decode step's time goes (host and GPU)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = Workload(1, (input_len, input_len), (1, 1), seed=99).requests(llm.engine.vocab_size)[0][0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        llm.generate([prompt], _greedy(steps), use_tqdm=False)
    with open(path, "w") as f:
        f.write(f"torch.profiler, batch 1, {input_len} prompt tokens, {steps} greedy output tokens\n\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=45))
        if torch.cuda.is_available():
            f.write("\n\n")
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def plot_sweep(rows: list[dict], baseline: dict | None, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    bs = [r["batch_size"] for r in rows]
    ax[0].plot(bs, [r["output_tok_per_s"] for r in rows], "o-", label="lanner")
    ax[0].set(xscale="log", xlabel="batch size", ylabel="output tokens/s", title="throughput")
    ax[1].plot(bs, [r["ms_per_token"] for r in rows], "o-", label="lanner")
    ax[1].set(xscale="log", xlabel="batch size", ylabel="ms per decode step", title="decode step time")
    if baseline:
        ax[0].axhline(baseline["tok_per_s"], color="gray", ls="--", label="transformers, batch 1")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace, engine_kwargs: dict) -> None:
    if args.kind == "moe":
        from lanner.bench import moe

        return moe.main(args)
    from lanner.engine.llm import LLM

    if args.kind == "speculative":
        from lanner.bench import speculative

        return speculative.main(args, {k: v for k, v in engine_kwargs.items() if k != "speculative_config"})
    if args.kind == "structured":
        from lanner.bench import structured

        return structured.main(args, engine_kwargs)
    if args.config:
        engine_kwargs = {"model": args.config, "load_format": "dummy", **engine_kwargs}
    path = engine_kwargs.get("model")
    baseline = None
    if args.compare_hf:  # first, so lanner can take the GPU memory afterwards
        dtype = getattr(torch, engine_kwargs.get("dtype", "bfloat16").replace("auto", "bfloat16"))
        hf = hf_baseline.load_hf(path, dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if args.kind == "latency":
            prompt = Workload(1, (args.input_len, args.input_len), (1, 1)).requests(hf.config.vocab_size)[0][0]
            baseline = hf_baseline.hf_latency(hf, prompt, args.output_len)
        else:
            baseline = hf_baseline.hf_throughput(hf, _workload(args).requests(hf.config.vocab_size))
        print("transformers:", baseline, flush=True)
        hf_baseline.release(hf)
    llm = LLM(**engine_kwargs)
    model = common.model_summary(llm.engine.hf_config)
    with frozen_heap():  # as the serving processes' heaps are (core/heap.py)
        results, workload = _measure(args, llm, baseline, path)
    engine_config = llm.engine.config.to_dict()
    if baseline:
        key = "tok_per_s" if args.kind == "latency" else "output_tok_per_s"
        ours = results["sweep"][0]["tok_per_s_per_seq"] if args.kind == "latency" else results["output_tok_per_s"]
        baseline["lanner_speedup"] = round(ours / baseline[key], 2)
    common.emit(common.record(args.kind, model, workload, results, engine_config, baseline), args.output_json)


def _measure(args: argparse.Namespace, llm, baseline: dict | None, path: str) -> tuple[dict, dict]:
    """The results and workload of one `lanner bench step|latency|throughput` run."""
    if args.kind == "step":
        results = {"steps": step_times(llm, args.token_counts, args.repeats), **_engine_facts(llm)}
        workload = {"token_counts": args.token_counts, "repeats": args.repeats}
        if llm.engine.config.scheduler.overlap_scheduling:
            workload["prefill, back to back"] = (f"{BACK_TO_BACK_RUNS} runs of {BACK_TO_BACK_STEPS} x repeats timed steps, "
                                                 "a fresh prompt added before each")
        else:
            workload |= {"mixed": f"{NUM_DECODES} decodes + one fresh prompt", "prefill": "one fresh prompt"}
    elif args.kind == "latency":
        rows = latency(llm, args.input_len, args.output_len, args.batch_sizes)
        results = {"sweep": rows, **_engine_facts(llm)}
        workload = {"input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True}
        if args.plot:
            plot_sweep(rows, baseline, args.plot, f"lanner bench latency: {path}")
        if args.profile:
            profile_decode(llm, args.input_len, args.profile)
    else:
        w = _workload(args)
        params, sampling = _sampling(args)
        results = {**throughput(llm, w, params), **_engine_facts(llm)}
        if args.breakdown:
            from lanner.bench.breakdown import breakdown

            results["breakdown"] = breakdown(llm, w, params)
        workload = {**common.workload_dict(w), **sampling, "ignore_eos": True}
    return results, workload


def _workload(args: argparse.Namespace) -> Workload:
    base = common.WORKLOADS[args.workload]
    return Workload(args.num_prompts or base.num_prompts, tuple(args.input_range or base.input_len),
                    tuple(args.output_range or base.output_len), base.seed)


def add_parser(sub) -> None:
    from lanner.config import add_cli_args

    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    kinds = bench.add_subparsers(dest="kind", required=True)
    lat = kinds.add_parser("latency", help="decode speed at batch 1 and a batch sweep")
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    lat.add_argument("--plot", default=None, help="write a PNG of the batch sweep here")
    lat.add_argument("--profile", default=None, help="write a torch.profiler table of batch-1 decode here")
    step = kinds.add_parser("step", help="one prefill or mixed step of N tokens: whole-forward graphs, piecewise graphs, "
                            "eager (with --no-overlap-scheduling); with overlap scheduling, a step of a stream of "
                            "N-token prompts, one a step")
    step.add_argument("--token-counts", type=int, nargs="+", default=[64, 256, 512, 2048, 8192])
    step.add_argument("--repeats", type=int, default=5,
                      help="synchronous steps timed a mode (their median); with overlap scheduling, "
                           "4 x this many timed steps a run")
    thr = kinds.add_parser("throughput", help="offline throughput of a fixed workload")
    thr.add_argument("--workload", choices=sorted(common.WORKLOADS), default="W-8B")
    thr.add_argument("--num-prompts", type=int, default=None)
    thr.add_argument("--input-range", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    thr.add_argument("--output-range", type=int, nargs=2, default=None, metavar=("LO", "HI"))
    thr.add_argument("--breakdown", action="store_true",
                     help="run the workload twice more: GPU time of prompt and decode steps, kernel time by kind")
    for flag, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float),
                       ("repetition_penalty", float), ("logprobs", int)):
        thr.add_argument("--" + flag.replace("_", "-"), type=kind, default=None,
                         help=f"every request's {flag} (greedy when no sampling flag is given; seeded)")
    from lanner.bench import moe, serve, speculative, structured

    serve.add_parser(kinds)
    speculative.add_parser(kinds)
    structured.add_parser(kinds)
    moe.add_parser(kinds)
    for p in (lat, thr):
        p.add_argument("--compare-hf", action="store_true", help="run transformers on the same workload first")
    step.set_defaults(compare_hf=False)  # a step is timed against lanner's own eager forward
    for p in (lat, step, thr):
        p.add_argument("--config", default=None, help="a config.json: random weights of that shape (dummy load)")
        p.add_argument("--output-json", default=None)
    for p in (lat, step, thr, kinds.choices["speculative"], kinds.choices["structured"]):
        p.set_defaults(func=lambda a: None)
        add_cli_args(p)
