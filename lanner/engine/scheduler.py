"""Continuous batching with chunked prefill and preemption by recompute.

One invariant drives every decision: a request needs
`num_tokens - num_computed_tokens` more tokens through the model (a prompt, the
rest of a prompt, or the one token sampled last step), plus its speculative
drafts if it has any (engine/speculation.py). Each step hands those
out under a token budget, running requests first, then waiting ones in arrival
order. When KV blocks run out, the newest running request is preempted: its
blocks are freed and it is recomputed later from its prompt plus the tokens it
already produced, so its output does not change.
"""
from __future__ import annotations

import time
from collections import deque

from lanner.config import SchedulerConfig
from lanner.core.request import Request, RequestStatus
from lanner.core.schedule import SchedulerOutput
from lanner.engine.kv_cache import KVCacheManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.lookahead = 0  # KV positions a model proposer writes past each step's tokens

    def add(self, req: Request) -> None:
        self.kv_cache.hash_prompt(req)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            if req.awaiting_last_token:  # nothing to compute; the engine finishes it on read-back
                idx += 1
                continue
            needed = req.num_tokens - req.num_computed_tokens
            num_new = min(needed + len(req.draft_token_ids), budget)
            del req.draft_token_ids[max(num_new - needed, 0):]  # drafts past the budget are dropped
            if not self._allocate_or_preempt(req, num_new, out.preempted):
                break  # it preempted itself: it was the last running request
            out.scheduled.append((req, num_new))
            if req.draft_token_ids:
                out.drafts[req] = list(req.draft_token_ids)
                if req.drafts_on_device:
                    out.unread_drafts.add(req)
            budget -= num_new
            idx += 1
        if out.preempted:  # memory is short: admit nobody new this step
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self.kv_cache.find_cached_blocks(req)
            num_new = min(req.num_tokens - len(cached) * self.kv_cache.block_size, budget)
            if num_new < req.num_tokens - len(cached) * self.kv_cache.block_size and \
                    not self.config.enable_chunked_prefill:
                break  # the whole prompt in a later step
            if not self.kv_cache.allocate(req, num_new, cached, self._lookahead(req, num_new, len(cached))):
                break
            self.waiting.popleft()
            self._start(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return out

    def decodes_only_next(self) -> bool:
        """The next step can only decode (or verify drafts): no running request is inside its
        prompt, and nobody waiting can be admitted."""
        return (all(r.num_tokens - r.num_computed_tokens <= 1 for r in self.running)
                and (not self.waiting or len(self.running) >= self.config.max_num_seqs))

    def finish(self, req: Request) -> None:
        """Release a request that the engine has finished (or aborted)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return
        self.kv_cache.free_request(req)

    def _start(self, req: Request) -> None:
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = time.monotonic()
            req.num_cached_tokens = req.num_computed_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _lookahead(self, req: Request, num_new: int, num_cached_blocks: int = 0) -> int:
        """Positions past the step's tokens to allocate, up to the request's last possible one."""
        end = req.num_computed_tokens + num_cached_blocks * self.kv_cache.block_size + num_new
        return max(min(self.lookahead, req.max_num_tokens - end), 0)

    def _allocate_or_preempt(self, req: Request, num_new: int, preempted: list[Request]) -> bool:
        while not self.kv_cache.allocate(req, num_new, lookahead=self._lookahead(req, num_new)):
            victim = self.running.pop()
            self.kv_cache.free_request(victim)
            victim.num_computed_tokens = 0
            victim.draft_token_ids = victim.proposed_token_ids = []
            victim.drafts_on_device = False
            victim.num_preemptions += 1
            self.num_preemptions += 1
            victim.status = RequestStatus.WAITING
            self.waiting.appendleft(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True
