"""Speculative decoding on the engine's side: drafts before scheduling, acceptance after the step.

Before each schedule the proposer drafts up to k tokens for every decoding request that may
speculate (`Request.can_speculate`). The scheduler gives such a request 1 + len(drafts) tokens
(its last token, then the drafts), the runner samples a row after each of them, keyed by that
token's output index, and the drafts are accepted while they equal the target's own samples
(lanner/sampling/rejection.py): the request emits the samples up to the first that differs, which
is what decoding without speculation would emit, greedy or seeded. The KV of rejected drafts is
given back: `num_computed_tokens` moves back so the next step rewrites their slots, and the prefix
cache only hashes tokens in `all_token_ids`, which drafts join only once accepted.

When drafts stop paying (the adaptive policy, on unless `"adaptive": false`): a request whose
verifications keep accepting no draft probes: it drafts one token at a time (no draft steps after
the first pass, one verified row) until a verification accepts it. While a step runs fewer than
PAUSE_FROM_BATCH requests, a verified row costs next to nothing (the step reads the weights either
way): a request probes after three misses in a row (two would turn good drafts into probes too
often by chance: at 76% acceptance per position, 6% of verifications against 1%), and probes
every step. From there on rows cost compute: a request starts by probing (it earns its k drafts
with an accepted one), probes after two misses in a row, and pauses between probes: 2 steps
after the second miss, then 4, 8, ... up to 64, so with nothing accepted about 1 step in 65
verifies one draft. None of this changes an output (any drafts, or none, give the target's
samples). The pause counts engine steps (also while the request waits or recomputes after a
preemption) and survives preemption. While no request of a step drafts next, a model proposer's
drafter only writes the draft's KV (its `fill_kv`: the draft's KV must follow the target's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lanner.config import SpeculativeConfig
from lanner.core.request import Request
from lanner.sampling.speculative import ModelProposer, make_proposer


@dataclass
class SpeculationStats:
    drafts: int = 0  # draft tokens verified
    accepted: int = 0  # of them, accepted
    verifications: int = 0  # request-steps that verified drafts
    accepted_at: list[int] = field(default_factory=list)  # per draft position: accepted there

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification (the accepted drafts and the target's own token)."""
        return 1 + self.accepted / self.verifications if self.verifications else 0.0

    def as_dict(self) -> dict:
        """What the bench JSON, LLM.get_metrics() and the server's /metrics report."""
        return {"spec_draft_tokens": self.drafts, "spec_accepted_tokens": self.accepted,
                "spec_verifications": self.verifications, "spec_accepted_per_position": list(self.accepted_at),
                "spec_mean_acceptance_length": round(self.mean_acceptance_length, 3)}


class Speculator:
    MAX_PAUSE = 64  # steps
    PAUSE_FROM_BATCH = 8  # running requests
    PAUSE_AFTER_MISSES = 2  # in a row: then a request of a batch that pauses probes, and pauses
    PROBE_AFTER_MISSES = 3  # in a row, in a smaller batch (where a probe saves only the draft steps)

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.adaptive = config.adaptive
        self.proposer = make_proposer(config)
        self.stats = SpeculationStats(accepted_at=[0] * self.k)
        self.pausing = False  # the last step ran PAUSE_FROM_BATCH requests or more

    @property
    def lookahead(self) -> int:
        """KV positions past a step's tokens that the proposer writes (a model proposer's own
        steps): the scheduler allocates them with the step's blocks."""
        if isinstance(self.proposer, ModelProposer):
            return self.k - 1 + self.proposer.shift
        return 0

    def propose(self, running: list[Request], proposed_on_device: int = 0) -> None:
        """Drafts for this step of each running request that decodes; none for the others.
        `proposed_on_device`: how many drafts per request the step in flight proposed that are
        not read back yet (0: none); a request still waiting for its tokens from that step takes
        them there (placeholders here, filled in on the device and, for the engine's
        bookkeeping, at that step's read-back)."""
        self.pausing = pausing = len(running) >= self.PAUSE_FROM_BATCH
        for req in running:
            req.draft_token_ids, req.drafts_on_device = [], False
            if req.spec_pause and pausing:
                req.spec_pause -= 1
                continue
            req.spec_pause = 0
            if req.speculative and req.spec_probing is None:  # (from its prompt step on)
                req.spec_probing = self.adaptive and pausing
            if not (req.speculative and req.num_tokens - req.num_computed_tokens == 1):
                continue
            # room for them and one more (with drafts in flight, as if all were accepted)
            k = min(req.max_drafts(self.k), req.max_num_tokens - req.num_tokens - 1)
            if k <= 0:
                continue
            if not req.num_pending:
                req.draft_token_ids = self.proposer.drafts(req, k)
            elif proposed_on_device and req.next_step_on_device:
                req.draft_token_ids, req.drafts_on_device = [0] * min(k, proposed_on_device), True

    def record(self, req: Request, drafts: list[int], samples: list[int]) -> int:
        """How many leading drafts the target's samples accept (counted in the stats)."""
        accepted = 0
        while accepted < len(drafts) and samples[accepted] == drafts[accepted]:
            self.stats.accepted_at[accepted] += 1
            accepted += 1
        self.stats.drafts += len(drafts)
        self.stats.accepted += accepted
        self.stats.verifications += 1
        if self.adaptive:
            req.spec_misses = 0 if accepted else req.spec_misses + 1
            probe_after = self.PAUSE_AFTER_MISSES if self.pausing else self.PROBE_AFTER_MISSES
            req.spec_probing = req.spec_misses >= probe_after or bool(req.spec_probing and not accepted)
            if req.spec_misses >= self.PAUSE_AFTER_MISSES:
                req.spec_pause = min(2 ** (req.spec_misses - 1), self.MAX_PAUSE)
        return accepted
