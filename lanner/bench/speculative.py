"""`lanner bench speculative`: real acceptance and speed of each proposer (issue [8], 7a, 7c).

Prompts are windows of held-out source files of this Python installation (files the shipped
models never saw in training), or with `--workload edits` (7c) code edits, where the prompt holds
most of the answer: a window of a held-out file, then a header announcing the same code with one
identifier renamed, and the first lines of that edited copy. They are decoded greedily at batch 1
(one request at a time) and at a larger batch, first without speculation (the same-run baseline), then with each proposer at
each k. Each row reports output tok/s, the speedup over the baseline at the same batch, the mean
acceptance length, the acceptance rate per draft position, and whether every output equals the
baseline's.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from lanner.bench import common
from lanner.core.transfer import to_device
from lanner.sampling.sampler import Sampler


def prompts_from_heldout_code(tokenizer, num: int, input_len: int) -> list[list[int]]:
    from lanner.models.tiny import heldout_code

    out = []
    for text in heldout_code(num * 2):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > input_len:
            start = (len(ids) - input_len) // 2  # from the middle: past license headers and imports
            out.append(ids[start:start + input_len])
        if len(out) == num:
            break
    return out


def prompts_for_code_edits(tokenizer, num: int, input_len: int) -> list[list[int]]:
    """7c: the code of a held-out window (half the prompt), then the same code with its most
    frequent identifier renamed, of which the prompt shows the header and the first two lines:
    what follows is mostly a copy of the window, as in an editing assistant's answer."""
    import collections
    import keyword
    import re

    out = []
    for ids in prompts_from_heldout_code(tokenizer, num * 2, input_len // 2):
        code = tokenizer.decode(ids)
        names = collections.Counter(n for n in re.findall(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b", code)
                                    if not keyword.iskeyword(n) and n not in ("self", "cls"))
        if not names:
            continue
        old = names.most_common(1)[0][0]
        edited = re.sub(rf"\b{old}\b", old + "_v2", code)
        head = "".join(edited.splitlines(keepends=True)[:2])
        text = f"{code}\n\n# ---- the same code, with `{old}` renamed to `{old}_v2` ----\n{head}"
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(out) == num:
            break
    return out


def run_batches(llm, prompts: list[list[int]], output_len: int, batches: list[int], repeats: int = 2) -> dict:
    """Per batch size, the last of `repeats` passes (the first compiles the kernels' variants that
    this engine's shapes need: Triton compiles on first use), each with an empty prefix cache."""
    from lanner.core.request import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    spec = llm.engine.speculator
    rows = {}
    for batch in [b for b in batches for _ in range(repeats)]:
        if spec is not None:
            spec.stats.__init__(accepted_at=[0] * spec.k)
        llm.reset_prefix_cache()  # no pass reads the last one's prompts from the cache
        outputs = []
        common.sync()
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            outputs += llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + batch]], params, use_tqdm=False)
        common.sync()
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        row = {"batch": batch, "output_tokens": tokens, "seconds": round(seconds, 3),
               "tok_per_s": round(tokens / seconds, 1), "outputs": [o.outputs[0].token_ids for o in outputs]}
        if spec is not None:
            s = spec.stats
            row.update(mean_acceptance_length=round(s.mean_acceptance_length, 3), verifications=s.verifications,
                       acceptance_rate_per_position=[round(a / max(s.verifications, 1), 3) for a in s.accepted_at])
        rows[batch] = row
    return rows


def release(llm) -> None:
    del llm.engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(args: argparse.Namespace, engine_kwargs: dict) -> None:
    from lanner.engine.llm import LLM

    if args.replay:
        return replay(args, engine_kwargs)

    llm = LLM(**engine_kwargs)
    make_prompts = prompts_for_code_edits if args.workload == "edits" else prompts_from_heldout_code
    prompts = make_prompts(llm.engine.tokenizer, args.num_prompts, args.input_len)
    model = common.model_summary(llm.engine.hf_config)
    base = run_batches(llm, prompts, args.output_len, args.batch_sizes, args.repeats)
    release(llm)
    results = []
    for method in args.methods:
        for k in args.k:
            config = {"method": method, "num_speculative_tokens": k, **({"prompt_lookup_max": 3} if method == "ngram" else {})}
            llm = LLM(**engine_kwargs, speculative_config=config)
            for batch, row in run_batches(llm, prompts, args.output_len, args.batch_sizes, args.repeats).items():
                same = sum(a == b for a, b in zip(row.pop("outputs"), base[batch]["outputs"]))
                results.append({"method": method, "k": k, **row, "speedup": round(row["tok_per_s"] / base[batch]["tok_per_s"], 3),
                                "outputs_identical": f"{same}/{len(prompts)}"})
                print({k_: v for k_, v in results[-1].items()}, flush=True)
            release(llm)
    baseline = {str(b): {k: v for k, v in r.items() if k != "outputs"} for b, r in base.items()}
    what = ("code edits (a held-out window, then its copy with one identifier renamed, begun)"
            if args.workload == "edits" else "windows of held-out source files of this Python installation")
    workload = {"prompts": f"{len(prompts)} {what}", "workload": args.workload,
                "prompt_tokens_mean": round(sum(map(len, prompts)) / max(len(prompts), 1), 1),
                "input_len": args.input_len, "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                "batch_sizes": args.batch_sizes}
    common.emit(common.record("speculative", model, workload, {"runs": results}, None,
                              {"no_speculation": baseline}), args.output_json)


def replay_drafts(llm, continuations: dict[tuple, list[int]], keep: dict[tuple, list[bool]],
                  samples: bool = False) -> None:
    """Benchmark-only `replay` mode: the proposer's network still runs (its cost is real), but the
    drafts it returns are replaced, on the device, by the target's own greedy continuation,
    recorded in a run without speculation, each position kept with a seeded probability (else a
    wrong token). On the device, so the engine's overlap of speculative steps (which never reads
    the drafts back before the next step uses them) runs as it would in service. `samples`: the
    target's samples are replaced by the recording too (after the real sampling ran), so a run
    never leaves its recording (bf16 near-ties of dummy weights make it diverge otherwise) and the
    acceptance follows p at any batch."""
    runner, vocab = llm.engine.runner, llm.engine.vocab_size
    drafter = runner.drafter
    keys = list(continuations)
    width = max(len(c) for c in continuations.values()) + drafter.k + 1

    def padded(rows):
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long, device=runner.device)

    truth = padded([continuations[key] for key in keys])
    table = padded([[t if ok else (t + 1) % vocab for t, ok in zip(continuations[key], keep[key])] for key in keys])
    row_of = {key: i for i, key in enumerate(keys)}
    prepare, propose = type(runner).prepare.__get__(runner), type(drafter).propose.__get__(drafter)
    samplers = []

    def noting_samplers(sched):
        prepared = prepare(sched)
        samplers[:] = dict.fromkeys(prepared[1])
        return prepared

    def replayed(staged, target_ids, samples, hidden):
        proposed = propose(staged, target_ids, samples, hidden)
        if proposed is None:
            return None
        rows = to_device([[row_of[tuple(r.prompt_token_ids)], r.num_prompt_tokens] for r in samplers], torch.long,
                         runner.device)
        # each request's first draft follows the token that its first-pass row reads (a head reads the
        # token after its row's position; a draft LM the token at it)
        accepted = 0 if drafter.accepted is None else drafter.accepted
        first_draft = staged.positions[staged.requests[:len(staged.decode_tables), 0] + accepted] + 2 - drafter.shift
        index = (first_draft - rows[:, 1])[:, None] + torch.arange(proposed.shape[1], device=runner.device)
        return table[rows[:, :1], index.clamp(0, width - 1)]

    runner.prepare, drafter.propose = noting_samplers, replayed
    runner.sampler = ReplayedSamples(Sampler(), truth if samples else None, row_of)


class ReplayedSamples:
    """A sampler whose tokens (after the real sampling ran) are the recorded continuation at each
    row's output index (moved on the device when the step was planned before its predecessor's
    accepted count was known)."""

    def __init__(self, sampler, truth, row_of: dict):
        self.sampler, self.truth, self.row_of = sampler, truth, row_of

    def __call__(self, logits, reqs, last_sampled=None, offsets=None, shifts=None, mask=None):
        if self.truth is not None and any(r.params.logprobs is not None for r in reqs):
            raise ValueError("replayed samples carry no logprobs (they would be the real tokens'): replay without them")
        sampled = self.sampler(logits, reqs, last_sampled, offsets, shifts, mask)
        if self.truth is None:
            return sampled
        at = to_device([[self.row_of[tuple(r.prompt_token_ids)], r.num_output_tokens + (offsets[i] if offsets else 0)]
                        for i, r in enumerate(reqs)], torch.long, logits.device)
        index = at[:, 1] + (shifts[0][:len(reqs)] if shifts is not None else 0)
        sampled.tokens = self.truth[at[:, 0], index.clamp(0, self.truth.shape[1] - 1)]
        return sampled


def replay(args: argparse.Namespace, engine_kwargs: dict) -> None:
    """Issue [8] 7b: a model shape with dummy weights and an EAGLE-3 head of dummy weights whose
    drafts are replayed (`replay_drafts`) at acceptance probabilities --replay, per --k."""
    import random

    from lanner.bench.common import Workload
    from lanner.core.request import SamplingParams
    from lanner.engine.llm import LLM
    from lanner.executor.step_handle import StepTimes

    engine_kwargs = {"model": args.config, "load_format": "dummy", **engine_kwargs}
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def build(**kwargs):
        """With dummy weights the logits of a 36-layer random network are nearly flat, so bf16
        rounding differences between the verify and the decode kernels flip the greedy token at
        almost every position, and no replayed continuation survives. Scaling the embedding makes
        each token's own embedding dominate the last hidden state: large margins, a stable greedy
        continuation, and the same cost per step."""
        llm = LLM(**engine_kwargs, **kwargs)
        llm.engine.runner.model.model.embed_tokens.weight.mul_(args.replay_embedding_scale)
        return llm

    def measure(llm, batch: int, prompts) -> dict:
        llm.engine.runner.step_times = times = StepTimes()
        if llm.engine.speculator is not None:
            llm.engine.speculator.stats.__init__(accepted_at=[0] * llm.engine.speculator.k)
        # no pass reads the last one's prompts from the cache (with a head, a hit's last block is
        # recomputed: a cost that a benchmark repeating its prompts would charge to speculation)
        llm.reset_prefix_cache()
        common.sync()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:batch]], params, use_tqdm=False)
        common.sync()
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        row = {"batch": batch, "output_tokens": tokens, "seconds": round(seconds, 3),
               "tok_per_s": round(tokens / seconds, 1), "steps": times.steps,
               "gpu_ms_per_step": {"target": round(times.target_ms / max(times.steps, 1), 3),
                                   "draft": round(times.draft_ms / max(times.steps, 1), 3)},
               "outputs": [o.outputs[0].token_ids for o in outs]}
        spec = llm.engine.speculator
        if spec is not None:
            row["mean_acceptance_length"] = round(spec.stats.mean_acceptance_length, 3)
            row["verifications"] = spec.stats.verifications  # request-steps with drafts (fewer when paused)
        return row

    llm = build()
    prompts = [p for p, _ in Workload(max(args.batch_sizes), (args.input_len, args.input_len), (1, 1)).requests(
        llm.engine.vocab_size)]
    model = common.model_summary(llm.engine.hf_config)
    base = {b: [measure(llm, b, prompts) for _ in range(args.repeats)][-1] for b in args.batch_sizes}
    release(llm)
    results, llm, built_k = [], None, None
    for k, p in zip(args.k, args.replay):
        if k != built_k:  # one engine per k, in the order given
            if llm is not None:
                release(llm)
            llm, built_k = build(speculative_config={"method": "eagle3", "num_speculative_tokens": k,
                                                     "model": args.head_config}), k
        for b in args.batch_sizes:
            continuations = {tuple(pr): out for pr, out in zip(prompts, base[b]["outputs"])}
            rng = random.Random(b * 1000 + k)
            keep = {key: [rng.random() < p for _ in range(args.output_len + k)] for key in continuations}
            replay_drafts(llm, continuations, keep, args.replay_samples)
            row = [measure(llm, b, prompts) for _ in range(args.repeats)][-1]
            outputs = row.pop("outputs")
            same = sum(a == c for a, c in zip(outputs, base[b]["outputs"]))
            row["first_difference_mean"] = round(sum(next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))
                                                     for a, c in zip(outputs, base[b]["outputs"])) / b, 1)
            # the GPU time of the baseline's steps over the GPU time of this run's steps: what the
            # speedup would be with no host time between steps (paused steps and a batch's slowest
            # request included, which a formula from the acceptance length alone would leave out)
            base_gpu_ms = base[b]["gpu_ms_per_step"]["target"] * base[b]["steps"]
            spec_gpu_ms = (row["gpu_ms_per_step"]["target"] + row["gpu_ms_per_step"]["draft"]) * row["steps"]
            ideal = base_gpu_ms / spec_gpu_ms if spec_gpu_ms else None
            speedup = row["tok_per_s"] / base[b]["tok_per_s"]
            results.append({"k": k, "p": p, **row, "speedup": round(speedup, 3),
                            "ideal_speedup": round(ideal, 3) if ideal else None,
                            "fraction_of_ideal": round(speedup / ideal, 3) if ideal else None,
                            "outputs_identical": f"{same}/{b}"})
            print(results[-1], flush=True)
    if llm is not None:
        release(llm)
    baseline = {str(b): {k: v for k, v in r.items() if k != "outputs"} for b, r in base.items()}
    workload = {"prompts": "random token ids", "input_len": args.input_len, "output_len": args.output_len,
                "embedding_scale": args.replay_embedding_scale,
                "greedy": True, "ignore_eos": True, "batch_sizes": args.batch_sizes, "head": args.head_config,
                "mode": "replay: the head runs, its drafts are the recorded greedy continuation, each position "
                        "kept with probability p" + ("; the target's samples are the recording too (after sampling "
                                                     "ran)" if args.replay_samples else "")}
    common.emit(common.record("speculative-replay", model, workload, {"runs": results}, None,
                              {"no_speculation": baseline}), args.output_json)


def add_parser(kinds) -> None:
    p = kinds.add_parser("speculative", help="acceptance and speed of each proposer on held-out code")
    p.add_argument("--methods", nargs="+", default=["ngram", "draft_model", "eagle3", "mtp"])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--workload", choices=["heldout", "edits"], default="heldout",
                   help="held-out code windows (7a), or code edits whose prompt holds most of the answer (7c)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-json", default=None)
    p.add_argument("--repeats", type=int, default=2, help="passes per batch size; the last is reported")
    p.add_argument("--replay", type=float, nargs="+", default=None, metavar="P",
                   help="replay mode (dummy weights): per --k value, the probability that each draft position "
                        "is the target's own token")
    p.add_argument("--replay-samples", action=argparse.BooleanOptionalAction, default=True,
                   help="replay mode: the target's samples are replaced by the recorded continuation too (after "
                        "sampling ran), so bf16 near-ties never make a run leave it and acceptance follows p at any "
                        "batch; --no-replay-samples checks the outputs against the first pass instead")
    p.add_argument("--replay-embedding-scale", type=float, default=10000.0,
                   help="replay mode: multiply the dummy embedding by this (stable greedy continuations)")
    p.add_argument("--config", default="benchmarks/configs/qwen3-8b.json", help="replay mode: the target's shape")
    p.add_argument("--head-config", default="benchmarks/configs/qwen3-8b-eagle3.json",
                   help="replay mode: the EAGLE-3 head's shape")
