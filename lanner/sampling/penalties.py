"""Repetition, presence and frequency penalties over token counts kept on the device.

A request's counts are made once, on its first penalized step (its prompt's tokens, its output's so
far), and each step after adds only the tokens read back since: building every request's history
from its token lists each step cost host work that grew with the context (6.5 ms a step at batch 32
with 2k-token contexts, on the CPU), and Qwen2.5's generation_config asks for a repetition penalty
by default. The token sampled last step and not read back yet (overlap scheduling), and the drafts
before a verify row, count on the device for that step only.
"""
from __future__ import annotations

import weakref

import torch

from lanner.core.request import Request
from lanner.core.transfer import to_device


class PenaltyCounts:
    """One row for each penalized request: its prompt's tokens (present or not) and its read-back
    output tokens (counted). A row returns to the free ones when its request is garbage: finished,
    or gone from a tensor-parallel rank's mirror. Rows x vocabulary x 5 bytes (~195 MB for 256 rows
    of a 152k vocabulary; the engine's memory profile counts max_num_seqs of them)."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.output = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.rows: weakref.WeakKeyDictionary[Request, list[int]] = weakref.WeakKeyDictionary()  # [row, counted]
        self.free: list[int] = []

    def rows_of(self, reqs: list[Request]) -> torch.Tensor:
        """Each request's row on the device, its output counted up to the tokens read back."""
        made, adds, index = [], [], []
        for req in reqs:
            kept = self.rows.get(req)
            if kept is None:
                kept = self.rows[req] = [self._take(req), 0]
                made.append(req)
            row, counted = kept
            if len(req.output_token_ids) > counted:
                adds += [(row, t) for t in req.output_token_ids[counted:] if t < self.vocab]
                kept[1] = len(req.output_token_ids)
            index.append(row)
        if made:
            fresh = to_device([self.rows[r][0] for r in made], torch.long, self.device)
            self.prompt.index_fill_(0, fresh, False)
            self.output.index_fill_(0, fresh, 0)
            cells = [(self.rows[r][0], t) for r in made for t in r.prompt_token_ids if t < self.vocab]
            if cells:
                row, col = to_device(cells, torch.long, self.device).unbind(1)
                self.prompt.index_put_((row, col), self.prompt.new_ones(len(cells)))  # a Python scalar would sync
        if adds:
            row, col = to_device(adds, torch.long, self.device).unbind(1)
            self.output.index_put_((row, col), self.output.new_ones(len(adds)), accumulate=True)
        return to_device(index, torch.long, self.device)

    def reserve(self, rows: int) -> None:
        """At least `rows` rows allocated (the engine's memory profile holds max_num_seqs of them)."""
        have = self.output.shape[0]
        if rows > have:
            self.free.extend(reversed(range(have, rows)))  # the same list: finalizers append to it
            prompt, output = self.prompt.new_zeros(rows, self.vocab), self.output.new_zeros(rows, self.vocab)
            prompt[:have], output[:have] = self.prompt, self.output
            self.prompt, self.output = prompt, output

    def _take(self, req: Request) -> int:
        if not self.free:
            self.reserve(max(8, 2 * self.output.shape[0]))
        row = self.free.pop()
        weakref.finalize(req, self.free.append, row)
        return row


def apply_penalties(logits: torch.Tensor, reqs: list[Request], last_sampled: torch.Tensor | None = None,
                    offsets: list[int] | None = None, counts: PenaltyCounts | None = None) -> torch.Tensor:
    """Penalize rows in place: repetition (prompt and output tokens, sign-aware), presence and
    frequency (output tokens). A request's pending token (sampled last step, not read back yet)
    counts from `last_sampled` at its sample row; a row that verifies a draft (offset j > 0) also
    counts the j drafts before it: if they are accepted, they are the history that decoding
    without drafts would have seen. `counts`: the sampler's, kept across steps (default: made
    for this call)."""
    vocab, device = logits.shape[1], logits.device
    rep = [i for i, r in enumerate(reqs) if r.params.repetition_penalty != 1.0]
    additive = [i for i, r in enumerate(reqs) if r.params.presence_penalty or r.params.frequency_penalty]
    if not rep and not additive:
        return logits
    counts = counts if counts is not None else PenaltyCounts(vocab, device)
    penalized = sorted(set(rep) | set(additive))
    rows = counts.rows_of([reqs[i] for i in penalized])
    output = counts.output[rows]  # a copy: this step's own tokens join it
    drafts = [(j, t) for j, i in enumerate(penalized) if offsets and offsets[i]
              for t in reqs[i].draft_token_ids[:offsets[i]] if t < vocab]
    pending = [(j, reqs[i].sample_row) for j, i in enumerate(penalized) if reqs[i].num_pending]
    for cells, device_tokens in ((drafts, False), (pending, True)):
        if cells:
            row, col = to_device(cells, torch.long, device).unbind(1)
            output.index_put_((row, last_sampled[col] if device_tokens else col), output.new_ones(len(cells)),
                              accumulate=True)
    at = {i: j for j, i in enumerate(penalized)}

    def of(selected: list[int]) -> torch.Tensor | None:  # their rows of `output` (None: all of them)
        return None if selected == penalized else to_device([at[i] for i in selected], torch.long, device)

    if rep:
        picked = of(rep)
        seen = counts.prompt[rows if picked is None else rows[picked]] | \
            ((output if picked is None else output[picked]) > 0)
        where = to_device(rep, torch.long, device)
        penalty = to_device([reqs[i].params.repetition_penalty for i in rep], torch.float32, device)[:, None]
        sub = logits[where]
        logits[where] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if additive:
        picked = of(additive)
        found = (output if picked is None else output[picked]).float()
        where = to_device(additive, torch.long, device)
        coef = to_device([[reqs[i].params.frequency_penalty, reqs[i].params.presence_penalty] for i in additive],
                         torch.float32, device)
        logits[where] -= coef[:, :1] * found + coef[:, 1:] * (found > 0).float()
    return logits
