"""Turn the logits of one step into tokens, on the device, without waiting for it.

Per row: logprobs of the raw model output (what `logprobs` reports, as vLLM
does by default), then min_tokens, repetition/presence/frequency penalties,
then greedy argmax or: temperature, top-k, top-p (over the top-k survivors),
min-p (relative to the most likely token), and an exponential race with
counter-based noise keyed by (request seed, output index), so a seeded request
samples the same tokens whatever else shares its batch, however its prompt was
chunked, and whether or not it was preempted.

Every per-row parameter reaches the device in one pinned, asynchronous copy;
the tokens stay on the device (the next step may read them there) until the
caller reads them back.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from lanner.core.request import Logprob, Request
from lanner.core.transfer import to_device
from lanner.kernels import next_power_of_2
from lanner.kernels.sampling_reference import race_sample_ref, row_key
from lanner.kernels.top_p_reference import top_p_threshold_ref
from lanner.sampling.penalties import PenaltyCounts, apply_penalties


@dataclass
class RowLogprobs:
    """Logprobs of some rows (sampled rows, or prompt positions), computed on the device when the
    step is launched and read back with its tokens: each row's chosen token's logprob and rank
    (1 + the tokens strictly more likely), and its `n` most likely tokens. Reading them row by row
    (`.item()`, `.tolist()`) took four device round trips a row and, under overlap scheduling,
    waited for the step launched after this one each time."""
    chosen: torch.Tensor  # [R] float32
    ranks: torch.Tensor  # [R]
    top_values: torch.Tensor  # [R, n]
    top_ids: torch.Tensor  # [R, n]

    @staticmethod
    def of(logprobs: torch.Tensor, tokens: torch.Tensor, n: int) -> RowLogprobs:
        """logprobs [R, V] (float32), tokens [R] (long), on one device."""
        chosen = logprobs.gather(1, tokens[:, None])
        ranks = (logprobs > chosen).sum(dim=1) + 1
        top_values, top_ids = logprobs.topk(n, dim=1)
        return RowLogprobs(chosen[:, 0], ranks, top_values, top_ids)

    def to_host(self) -> RowLogprobs:
        """Copies on the host, enqueued after the step's work (read once it is done)."""
        return RowLogprobs(*(t.to("cpu", non_blocking=True) for t in
                             (self.chosen, self.ranks, self.top_values, self.top_ids)))

    def entries(self, tokens: list[int], counts: list[int]) -> list[dict[int, Logprob]]:
        """Host side, once read back: per row, {chosen token, then its top counts[j]} -> Logprob."""
        chosen, ranks, values, ids = (t.tolist() for t in (self.chosen, self.ranks, self.top_values, self.top_ids))
        out = []
        for j, (token, n) in enumerate(zip(tokens, counts)):
            entry = {token: Logprob(chosen[j], ranks[j])}
            for rank, (value, tid) in enumerate(zip(values[j][:n], ids[j][:n]), start=1):
                entry.setdefault(tid, Logprob(value, rank))
            out.append(entry)
        return out


@dataclass
class Sampled:
    tokens: torch.Tensor  # [B] on the device
    logprobs: RowLogprobs | None = None  # of the rows that asked for logprobs (`logprob_rows`), in order


def logprob_rows(reqs: list[Request]) -> list[int]:
    """The sampler rows whose requests asked for logprobs."""
    return [i for i, r in enumerate(reqs) if r.params.logprobs is not None]


@dataclass
class GrammarMask:
    """Structured outputs' bitmask of one step (engine/grammar.py): [R, ceil(V/32)] int32 on the
    device, bit t of a row set where token t is allowed, for sampler rows `rows` [R]."""
    bitmask: torch.Tensor
    rows: torch.Tensor


class Sampler:
    def __init__(self):
        self.penalty_counts: PenaltyCounts | None = None  # made at the first penalized row
        self.logprobs = True  # False where nothing reads them (tensor-parallel ranks > 0)

    def warm_up(self, vocab: int, device: torch.device) -> None:
        """Compile the GPU's sampling kernels (the race draw, top-p's threshold search) at the
        engine's start: the first sampled request would compile them in its step, stalling every
        running request (a fresh machine builds each kernel's launcher too)."""
        if device.type != "cuda":
            return
        from lanner.kernels.sampling import race_sample

        probs = torch.full((2, vocab), 1.0 / vocab, device=device)
        race_sample(probs, torch.zeros(2, 2, dtype=torch.long, device=device))
        nucleus_threshold(probs, torch.full((2,), 0.5, device=device))

    def __call__(self, logits: torch.Tensor, reqs: list[Request], last_sampled: torch.Tensor | None = None,
                 offsets: list[int] | None = None, shifts: tuple[torch.Tensor, list[int]] | None = None,
                 mask: GrammarMask | None = None) -> Sampled:
        """logits: [B, V] (one row per request, in order). `mask`: structured outputs' allowed
        tokens, applied first (so logprobs, like vLLM's, are those of the constrained logits). `last_sampled`: the previous step's
        tokens on the device, where a request's pending token (overlap scheduling) is read.
        `offsets`: per row, how many tokens past the request's output so far it samples (the
        rows that verify drafts); the draw is keyed by that output index. `shifts`: for a step
        planned before the drafts of the one before it were read back, (per row on the device, the
        shift of that output index, in [-spread, 0]; per row on the host, its spread)."""
        index = [r.num_output_tokens + (offsets[i] if offsets else 0) for i, r in enumerate(reqs)]
        if mask is None and all(_plain_greedy(r, n) for r, n in zip(reqs, index)):  # the fast path: one kernel
            return Sampled(logits.argmax(dim=-1))
        # a copy even in float32: the rows are edited in place, and the step's logits serve prompt_logprobs
        logits = logits.to(torch.float32, copy=True)
        if mask is not None:
            logits = apply_bitmask(logits, mask.bitmask, mask.rows)
        asking = logprob_rows(reqs) if self.logprobs else []
        subset = to_device(asking, torch.long, logits.device) if asking and len(asking) < len(reqs) else None
        raw_logprobs = torch.log_softmax(logits if subset is None else logits[subset], dim=-1) if asking else None
        logits = apply_min_tokens(logits, reqs, index)
        if any(r.has_logit_constraints for r in reqs):
            logits = apply_constraints(logits, reqs)
        counts = self.penalty_counts
        if counts is None or counts.vocab != logits.shape[1] or counts.device != logits.device:
            self.penalty_counts = PenaltyCounts(logits.shape[1], logits.device)
        logits = apply_penalties(logits, reqs, last_sampled, offsets, self.penalty_counts)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if random_rows:
            device = logits.device
            rows = to_device(random_rows, torch.long, device)
            probs = processed_probs(logits[rows], [reqs[i].params for i in random_rows])
            keys = random_keys(reqs, random_rows, index, device, shifts)
            if probs.is_cuda:
                from lanner.kernels.sampling import race_sample  # Triton: the GPU path only

                tokens[rows] = race_sample(probs, keys)
            else:
                tokens[rows] = race_sample_ref(probs, keys)
        if raw_logprobs is None:
            return Sampled(tokens)
        chosen = tokens if subset is None else tokens[subset]
        return Sampled(tokens, RowLogprobs.of(raw_logprobs, chosen, max(reqs[i].params.logprobs for i in asking)))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """-inf where a row's bit is 0 (`GrammarMask`); asynchronous, on any device."""
    vocab = logits.shape[1]
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def random_keys(reqs: list[Request], rows: list[int], index: list[int], device: torch.device,
                shifts: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
    """[len(rows), 2] keys of these rows' draws. With shifts, the host keys every output index
    a row may turn out to have and the device picks the one its shift names."""
    if shifts is None or not any(shifts[1][i] for i in rows):
        return to_device([row_key(reqs[i].seed, index[i]) for i in rows], torch.long, device)
    shift, spread = shifts
    candidates, zero_shift = [], []
    for i in rows:
        zero_shift.append(len(candidates) + spread[i])
        candidates += [row_key(reqs[i].seed, index[i] + s) for s in range(-spread[i], 1)]
    table = to_device(candidates + [(z, i) for z, i in zip(zero_shift, rows)], torch.long, device)
    picked = table[len(candidates):, 0] + shift[table[len(candidates):, 1]]
    return table[picked]


def sampled_logprobs(logprobs: RowLogprobs | None, reqs: list[Request], tokens: list[int]) -> list[dict | None]:
    """Host side, once a step's tokens and the host copy of its `Sampled.logprobs` are read
    back: the logprobs each sampler row's request asked for."""
    out: list[dict | None] = [None] * len(reqs)
    if logprobs is not None:
        rows = logprob_rows(reqs)
        for i, entry in zip(rows, logprobs.entries([tokens[i] for i in rows], [reqs[i].params.logprobs for i in rows])):
            out[i] = entry
    return out


def prompt_targets(prompt_rows: list) -> list[int]:
    """The prompt tokens that `prompt_rows`' consecutive rows predict, in row order."""
    return [t for _, _, ts in prompt_rows for t in ts]


def prompt_logprobs(logits: torch.Tensor, prompt_rows: list, max_elements: int = 1 << 26) -> list[RowLogprobs]:
    """The logprobs of the prompt tokens a step's chunk predicts: `prompt_rows` (request, first
    row, targets) name consecutive rows of `logits`. In pieces of at most `max_elements` float32
    logprobs (a long prompt chunk's rows times the vocabulary would be gigabytes at once)."""
    first = prompt_rows[0][1]
    targets = prompt_targets(prompt_rows)
    n = max(req.params.prompt_logprobs for req, _, _ in prompt_rows)
    device_targets = to_device(targets, torch.long, logits.device)
    step = max(1, max_elements // logits.shape[1])
    return [RowLogprobs.of(torch.log_softmax(logits[first + a:first + min(a + step, len(targets))].float(), dim=-1),
                           device_targets[a:a + step], n) for a in range(0, len(targets), step)]


def prompt_logprob_entries(pieces: list[RowLogprobs], prompt_rows: list) -> dict[str, list[dict[int, Logprob]]]:
    """Host side: the host copies of `prompt_logprobs`' pieces, read back, as each request's entries."""
    targets = prompt_targets(prompt_rows)
    counts = [req.params.prompt_logprobs for req, _, ts in prompt_rows for _ in ts]
    entries: list[dict[int, Logprob]] = []
    for piece in pieces:
        at = len(entries)
        entries += piece.entries(targets[at:at + len(piece.ranks)], counts[at:at + len(piece.ranks)])
    out, at = {}, 0
    for req, _, ts in prompt_rows:  # consecutive rows
        out[req.request_id] = entries[at:at + len(ts)]
        at += len(ts)
    return out


def _plain_greedy(r: Request, index: int) -> bool:
    p = r.params
    return (p.greedy and p.logprobs is None and not r.has_penalties and index >= p.min_tokens
            and not r.has_logit_constraints)


def apply_min_tokens(logits: torch.Tensor, reqs: list[Request], index: list[int] | None = None) -> torch.Tensor:
    """Stop tokens masked in rows whose output index (default: the request's next) is below min_tokens."""
    vocab = logits.shape[1]
    index = index or [r.num_output_tokens for r in reqs]
    cells = [(i, t) for i, r in enumerate(reqs) if index[i] < r.params.min_tokens
             for t in r.stop_token_ids if t < vocab]
    if cells:
        rows, cols = to_device(cells, torch.long, logits.device).unbind(1)
        # a Python scalar value would be copied from pageable memory, which syncs
        logits.index_put_((rows, cols), logits.new_full((len(cells),), float("-inf")))
    return logits


def apply_constraints(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """allowed_token_ids, bad words, logit_bias, then logits processors (before penalties, in
    vLLM's order). The first three are batched through pinned copies (no sync); bad words
    and processors read output tokens on the host, which the engine guarantees are all there
    (`Request.reads_output_on_host`)."""
    vocab, device = logits.shape[1], logits.device
    whitelisted = [i for i, r in enumerate(reqs) if r.params.allowed_token_ids]
    if whitelisted:
        cells = [(j, t) for j, i in enumerate(whitelisted) for t in reqs[i].params.allowed_token_ids if t < vocab]
        keep = torch.zeros(len(whitelisted), vocab, dtype=torch.bool, device=device)
        row, col = to_device(cells, torch.long, device).unbind(1)
        keep.index_put_((row, col), keep.new_ones(len(cells)))  # a Python scalar would sync
        rows = to_device(whitelisted, torch.long, device)
        logits[rows] = logits[rows].masked_fill(~keep, float("-inf"))
    banned = [(i, t) for i, r in enumerate(reqs) for t in banned_words(r) if t < vocab]
    if banned:
        row, col = to_device(banned, torch.long, device).unbind(1)
        logits.index_put_((row, col), logits.new_full((len(banned),), float("-inf")))
    bias = [(i, t, b) for i, r in enumerate(reqs) for t, b in (r.params.logit_bias or {}).items() if t < vocab]
    if bias:
        row, col = to_device([(i, t) for i, t, _ in bias], torch.long, device).unbind(1)
        logits.index_put_((row, col), to_device([b for _, _, b in bias], torch.float32, device), accumulate=True)
    for i, r in enumerate(reqs):
        for fn in r.params.logits_processors or []:
            args = (r.output_token_ids, logits[i])
            if len(inspect.signature(fn).parameters) == 3:  # vLLM's (prompt ids, output ids, logits) form
                args = (r.prompt_token_ids, *args)
            logits[i] = fn(*args)
    return logits


def banned_words(r: Request) -> list[int]:
    """The last token of each bad word whose other tokens end the output (vLLM's rule)."""
    out = r.output_token_ids
    return [ids[-1] for ids in r.bad_word_ids
            if len(ids) == 1 or (len(out) >= len(ids) - 1 and out[len(out) - len(ids) + 1:] == ids[:-1])]


TOP_K_FIRST = 1024  # a row keeping at most this many tokens takes them with topk, not a sort of the vocabulary
TOP_P_SEARCH = -1  # `candidates` of a row with top-p and no top-k: a threshold search (kernels/top_p.py)
TOP_P_ALL = 1.0 - 2.0 ** -25  # a top_p from here up is 1.0 in float32, the table's type: it keeps every token


def candidates(params, vocab: int) -> int:
    """How many of a row's most likely tokens its top-k and top-p are applied over: none (0) for a
    row with neither (temperature alone, min-p: no order needed), a power of two >= its top_k (64 at
    least) for a small top_k, TOP_P_SEARCH for top-p alone (no order either: a threshold), else the
    whole vocabulary (a sort). From the row's own parameters only: were it the batch's largest
    top_k, tokens tied at a row's k-th place would be kept or not depending on what shares its batch."""
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k == vocab:
        return 0 if params.top_p >= TOP_P_ALL else TOP_P_SEARCH
    return min(max(64, next_power_of_2(k)), vocab) if k <= TOP_K_FIRST else vocab


def processed_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over rows of logits -> probabilities. Only rows with a
    top_k over TOP_K_FIRST sort the vocabulary (`candidates`): with 152k tokens that sort was most
    of a sampled step's sampling time (CPU, 64 rows: 550 ms, against 57 filtering topk's candidates)."""
    vocab = logits.shape[1]
    table = to_device([[p.temperature, p.top_k if 0 < p.top_k < vocab else vocab, p.top_p, p.min_p] for p in params],
                      torch.float32, logits.device)
    logits = logits / table[:, :1]
    groups: dict[int, list[int]] = {}  # candidates -> rows
    for i, p in enumerate(params):
        groups.setdefault(candidates(p, vocab), []).append(i)
    if len(groups) == 1:
        (width,) = groups
        return _filtered(logits, table, width, any(p.min_p > 0 for p in params)).softmax(dim=-1)
    out = torch.empty_like(logits)
    for width, rows in groups.items():
        index = to_device(rows, torch.long, logits.device)
        out[index] = _filtered(logits[index], table[index], width, any(params[i].min_p > 0 for i in rows))
    return out.softmax(dim=-1)


def _filtered(logits: torch.Tensor, table: torch.Tensor, width: int, uses_min_p: bool) -> torch.Tensor:
    """Logits (already over temperature) with -inf outside each row's top-k, top-p and min-p sets.
    The candidates are each row's `width` largest: the vocabulary (a sort), fewer (topk), or none:
    TOP_P_SEARCH (top-p alone, a probability threshold), 0 (rows with neither top-k nor top-p, where
    only min-p can drop a token: unchanged when no row has one, so temperature alone costs one softmax)."""
    top_k, top_p, min_p = (table[:, j:j + 1] for j in range(1, 4))
    if width <= 0:
        if width == 0 and not uses_min_p:
            return logits
        probs = logits.softmax(dim=-1)
        threshold = nucleus_threshold(probs, top_p.flatten())[:, None] if width == TOP_P_SEARCH else None
        if uses_min_p:
            by_min_p = min_p * probs.amax(dim=-1, keepdim=True)
            threshold = by_min_p if threshold is None else torch.maximum(threshold, by_min_p)
        return logits.masked_fill(probs < threshold, float("-inf"))
    if width < logits.shape[1]:
        sorted_logits, order = logits.topk(width, dim=-1)
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(width, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more likely tokens
    # (top_p 1 keeps all: float32 sums reach 1 before the tail, which would otherwise be dropped)
    drop = (before >= top_p) & (ranks > 0) & (top_p < 1.0)
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability its top-p keeps (kernels/top_p_reference.py): a sort on the
    CPU, a search in a few passes over the row on the GPU (the sort's filter of 256 rows of 152k
    tokens took 5.1 ms on an H200, the search's 2.0: scripts/top_p_probe.py)."""
    if probs.is_cuda:
        from lanner.kernels.top_p import top_p_threshold  # Triton: the GPU path only

        return top_p_threshold(probs, top_p)
    return top_p_threshold_ref(probs, top_p)
