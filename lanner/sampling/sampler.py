"""Turn the logits of one step into tokens.

Per row: logprobs of the raw model output (what `logprobs` reports, as vLLM
does by default), then min_tokens, repetition/presence/frequency penalties,
then greedy argmax or: temperature, top-k, top-p (over the top-k survivors),
min-p (relative to the most likely token), and an exponential-race draw from
the request's own generator, so a seeded request samples the same tokens
whatever else shares its batch.
"""
from __future__ import annotations

import torch

from lanner.engine.request import Logprob, Request


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[dict | None]]:
        """logits: [B, V] (one row per request, in order) -> sampled ids and per-row logprobs."""
        if all(_plain_greedy(r) for r in reqs):  # the common fast path: one kernel, one copy
            return logits.argmax(dim=-1).tolist(), [None] * len(reqs)
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        logits = apply_min_tokens(logits, reqs)
        logits = apply_penalties(logits, reqs)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = processed_probs(logits[rows], [reqs[i].params for i in random_rows])
            drawn = [race(probs[j], reqs[i].generator) for j, i in enumerate(random_rows)]
            tokens[rows] = torch.stack(drawn)
        token_list = tokens.tolist()
        logprobs = [None] * len(reqs)
        if raw_logprobs is not None:
            for i, r in enumerate(reqs):
                if r.params.logprobs is not None:
                    logprobs[i] = top_logprobs(raw_logprobs[i], token_list[i], r.params.logprobs)
        return token_list, logprobs


def _plain_greedy(r: Request) -> bool:
    p = r.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and len(r.output_token_ids) >= p.min_tokens)


def apply_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    for i, r in enumerate(reqs):
        if len(r.output_token_ids) < r.params.min_tokens and r.stop_token_ids:
            logits[i, [t for t in r.stop_token_ids if t < logits.shape[1]]] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    vocab = logits.shape[1]
    for i, r in enumerate(reqs):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in r.all_token_ids if t < vocab}), dtype=torch.long,
                                device=logits.device)
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            counts = torch.bincount(torch.tensor(r.output_token_ids, device=logits.device), minlength=vocab)[:vocab]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def processed_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over rows of logits -> probabilities."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temperature
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more likely tokens
    drop = (before >= top_p[:, None]) & (ranks > 0)
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return out.softmax(dim=-1)


def race(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one index with probability `probs` (argmax of p / Exp(1) noise)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()


def top_logprobs(logprobs: torch.Tensor, token: int, n: int) -> dict[int, Logprob]:
    """The chosen token's logprob and rank plus the n most likely tokens."""
    chosen = logprobs[token]
    out = {token: Logprob(chosen.item(), int((logprobs > chosen).sum().item()) + 1)}
    if n:
        values, ids = logprobs.topk(n)
        for rank, (value, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(tid, Logprob(value, rank))
    return out
