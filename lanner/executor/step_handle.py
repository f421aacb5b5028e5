"""A launched step (`StepHandle`): what the model runner enqueued, and the host copies of its
results once they are read back (`RunnerOutput`); `StepTimes` adds up launched steps' GPU time
for benchmarks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lanner.core.request import Logprob, Request
from lanner.sampling.sampler import RowLogprobs, Sampled, prompt_logprob_entries, sampled_logprobs


@dataclass
class StepTimes:
    """GPU time of launched steps (CUDA events, read at read-back), for benchmarks: the target's
    forward and sampling, and a drafter's work, in milliseconds."""
    steps: int = 0
    target_ms: float = 0.0
    draft_ms: float = 0.0
    each: list[tuple[float, float]] | None = None  # a list: also (target, draft) ms of every step

    def add(self, events: list) -> None:
        target, draft = events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])
        self.steps += 1
        self.target_ms += target
        self.draft_ms += draft
        if self.each is not None:
            self.each.append((round(target, 3), round(draft, 3)))


class StepHandle:
    """A launched step. `result()` waits for it and reads the tokens back."""

    def __init__(self, samplers: list[Request], prompt_rows: list, timed: tuple[StepTimes, list] | None = None,
                 routing: tuple[list, torch.Tensor] | None = None):
        self.samplers = samplers
        # (request, first position, first row, rows) per recording request, and their rows of the
        # record (gathered at launch: the next step rewrites the record before this one is read)
        self.routing = None if routing is None else (routing[0], routing[1].to("cpu", non_blocking=True))
        self.prompt_rows = prompt_rows
        self.timed = timed
        self.sampled: Sampled | None = None
        self.tokens = self.proposed = self.done = self.logprobs = None
        self.prompt_logprobs: list[RowLogprobs] = []  # host copies, pieces of the prompt rows in order
        self.unsampled: tuple | None = None  # what `ModelRunner.sample` needs, until it has run

    def launched(self, sampled: Sampled | None, proposed: torch.Tensor | None, device: torch.device,
                 prompt_logprobs: list[RowLogprobs]) -> None:
        """Its sampling (and drafting) is enqueued: start the copies back."""
        self.sampled = sampled
        self.tokens = sampled.tokens.to("cpu", non_blocking=True) if sampled is not None else None
        self.logprobs = sampled.logprobs.to_host() if sampled is not None and sampled.logprobs is not None else None
        self.prompt_logprobs = [piece.to_host() for piece in prompt_logprobs]
        # a copy even on the CPU: the draft graphs' output buffer is rewritten by the next step
        self.proposed = proposed.to("cpu", non_blocking=True, copy=True) if proposed is not None else None
        self.done = torch.cuda.Event() if device.type == "cuda" else None
        if self.done is not None:
            self.done.record()

    @torch.inference_mode()
    def result(self) -> RunnerOutput:
        if self.done is not None:
            self.done.synchronize()
        if self.timed is not None:
            self.timed[0].add(self.timed[1])
        out = RunnerOutput()
        if self.sampled is not None:
            tokens = self.tokens.tolist()
            out.sampled = list(zip(self.samplers, tokens, sampled_logprobs(self.logprobs, self.samplers, tokens)))
        if self.proposed is not None:
            out.proposed = dict(zip(dict.fromkeys(self.samplers), self.proposed.tolist()))
        if self.routing is not None:
            spans, rows = self.routing
            out.routed_experts = [(req, begin, rows[row:row + n].tolist()) for req, begin, row, n in spans]
        if self.prompt_rows:
            out.prompt_logprobs = prompt_logprob_entries(self.prompt_logprobs, self.prompt_rows)
        return out


@dataclass
class RunnerOutput:
    # (request, sampled token, its logprobs or None) for requests that reached their last token
    sampled: list[tuple[Request, int, dict[int, Logprob] | None]] = field(default_factory=list)
    # request id -> logprobs of the prompt tokens this step's chunk predicted
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)
    # a model proposer's k drafts for each sampling request's next step
    proposed: dict[Request, list[int]] = field(default_factory=dict)
    # (request, first position, per position [MoE layers][top_k] experts) for requests recording routing
    routed_experts: list[tuple[Request, int, list]] = field(default_factory=list)


def first_rows(samplers: list[Request]) -> dict[Request, int]:
    """Each sampling request's first sampler row, in order."""
    first: dict[Request, int] = {}
    for row, req in enumerate(samplers):
        first.setdefault(req, row)
    return first
