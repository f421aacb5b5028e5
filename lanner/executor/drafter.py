"""Drafter: runs a model proposer (draft model, EAGLE-3 head, MTP layer) on the device right
after each target step, and returns k drafts per sampling request without a host sync.

The draft keeps its own KV cache over the target's block tables (the same slots; the scheduler
allocates k-1 more positions ahead, one more for a draft LM). Per step:

1. First pass, over the same tokens as the target step, so the draft's KV follows the target's
   through prompts, chunks, prefix hits and rejected drafts. A head (shift 0) reads at position p
   the token p+1 beside the target's hidden state at p; a draft LM (shift 1) reads token p at p,
   and first re-reads the target's first token of the step. The tokens after the step's last
   known one are the target's samples: for a request that verified m drafts, its m+1 samples.
   Rows after the first rejected draft carry wrong tokens; their KV is rewritten by the next step
   (the target recomputes those positions, and the draft with it).
2. Acceptance on the device: a = how many leading drafts equal the target's samples (the engine
   counts the same on the host). The first draft comes from the first-pass row of sample a.
3. k-1 decode steps, one token per request, each at the next position, feeding a head its own
   pre-norm output (EAGLE-3, MTP); none when every request that drafts next probes with one
   draft (engine/speculation.py).

On the GPU the first pass replays the draft's own graphs (`FirstPassGraphs`), in three capture
modes: steps whose every target token samples (decode and verify) attend one decode row per token,
keyed by row count; prompt chunks of up to 512 tokens, keyed by token count, with the prefill
kernel inside the graph; and decode rows after which nobody drafts (all paused), where only the
draft's KV is written (`fill_kv`). Steps 2 and 3 replay `DraftGraphs` (keyed by the number of
sampling requests) after a first pass that a graph ran; the first pass's graphs leave their outputs
in one set of static buffers (`FirstPassBuffers`) for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lanner.core.batch import LONG_CHUNK, ForwardBatch, as_decode_rows, kv_slot_array, kv_slots
from lanner.core.transfer import Pieces, PinnedRing, to_device_parts
from lanner.executor.deferred import Deferred
from lanner.executor.graphs import CaptureReport, SizeLadder, fewest_rows_of_decode_shapes, warm_up_kernel_shapes
from lanner.executor.kv_tensors import allocate_kv_caches, kv_block_bytes
from lanner.executor.piecewise import piecewise_sizes
from lanner.layers.attention import forward_context
from lanner.sampling.rejection import accepted_prefix
from lanner.sampling.speculative import ModelProposer

# prompt chunks of the draft's first pass up to this many tokens replay graphs; beyond, a step is
# compute-bound (and the prefill kernel's grid, fixed at capture for the most sequences and the
# longest query, would grow as their product)
DRAFT_PREFILL_GRAPH_MAX_TOKENS = 512


@dataclass
class StagedDraft:
    """The host-built part of a step's draft work, already copied to the device."""
    sources: torch.Tensor  # [R] per first-pass row: index into cat(target input ids, samples, known tokens)
    known: torch.Tensor  # next prompt tokens of requests that do not sample this step
    positions: torch.Tensor  # [R]
    slots: torch.Tensor  # [R]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    num_target_tokens: int
    # per sampling request, in sampler order, then padding rows up to the draft graphs' size:
    # [first-pass row that carries the request's first sample, positions its allocated blocks
    # hold, k target input rows of the verified drafts (-1 past them), k sampler rows of the
    # samples compared with them]; a padding row is [0, 0, -1.., 0..]
    requests: torch.Tensor  # [B padded, 2 + 2k]
    tables: torch.Tensor  # [B, W] block ids for the decode steps' slots; -1 past the allocated ones
    decode_tables: list[list[int]]
    decode_rows: bool = False  # every first-pass row attends as a decode row (query_lens all 1)
    # the most drafts a request may take next step: k; 1 (only probing requests draft: the first
    # draft, no k-1 steps); 0 (nobody drafts: the pass only fills the draft's KV)
    draft_len: int = 1
    verifying: bool = True  # some request verifies drafts in this step
    device_seq_lens: torch.Tensor | None = None  # decode rows' lengths, when positions moved on the device


class Drafter:
    def __init__(self, proposer: ModelProposer, net, target, max_tokens: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.proposer = proposer
        self.net = net
        self.k = proposer.k
        self.shift = proposer.shift
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.uploads = PinnedRing(device)  # each step's staged inputs (one take a step)
        self.backend = None
        self.graphs: DraftGraphs | None = None
        self.first_pass_graphs: FirstPassGraphs | None = None
        self.kv_fill_graphs: FirstPassGraphs | None = None
        self.prefill_graphs: FirstPassGraphs | None = None
        self.first_pass_buffers: FirstPassBuffers | None = None
        # [B] the last step's drafts accepted, per sampling request (None when it verified none)
        self.accepted: torch.Tensor | None = None
        # EAGLE-3 reads the hidden states entering three target layers: the target's forward
        # (eager, piecewise or graphs) copies them into this one static buffer
        self.aux_hidden = None
        if proposer.target_hidden == "aux":
            hidden = target.spec.hidden_size
            self.aux_hidden = torch.zeros(max_tokens, 3 * hidden, dtype=dtype, device=device)
            for i, layer in enumerate(proposer.aux_layers):
                target.model.layers[layer].aux_out = self.aux_hidden[:, i * hidden:(i + 1) * hidden]

    def block_bytes(self) -> int:
        return kv_block_bytes(self.net.spec, self.block_size, self.dtype)

    def allocate(self, num_blocks: int, make_backend, max_rows: int) -> None:
        """`max_rows`: the target's most decode rows in a step (a draft LM reads one more per request)."""
        self.kv_caches = allocate_kv_caches(self.net.spec, num_blocks, self.block_size, self.dtype, self.device)
        self.max_rows = max_rows
        self.backend = make_backend(self.kv_caches, self.net.spec.num_heads, max_rows)

    def capture(self, seq_sizes: list[int], row_sizes: list[int], token_sizes: list[int], max_model_len: int,
                max_num_seqs: int, target_ids: torch.Tensor) -> None:
        """The draft's graphs: the first pass of decode and verify steps at each row count, of
        prompt chunks at each token count (up to DRAFT_PREFILL_GRAPH_MAX_TOKENS; none without
        `token_sizes`), the k-1 steps at each batch size. A prompt step holds up to max_num_seqs
        requests, whatever the graph ladders. `target_ids`: the runner's static input ids."""
        rows = [r for r in row_sizes if r <= self.max_rows]
        # a draft LM reads one more row per request than the target's step has tokens
        largest = [token_sizes[-1] + self.shift * max_num_seqs] if token_sizes and self.shift else []
        tokens = sorted({t for t in token_sizes + largest if t <= DRAFT_PREFILL_GRAPH_MAX_TOKENS})
        self.first_pass_buffers = FirstPassBuffers.allocate(self, max(rows + tokens, default=0))
        self.first_pass_graphs = FirstPassGraphs(self, rows)
        self.first_pass_graphs.capture()
        self.kv_fill_graphs = FirstPassGraphs(self, rows, kv_only=True)
        self.kv_fill_graphs.capture()
        if tokens:
            self.prefill_graphs = FirstPassGraphs(self, tokens, prefill=True)
            self.prefill_graphs.capture()
        self._warm_up_eager_prompt_chunks(tokens[-1] if tokens else 0)
        self._warm_up_eager_decode_rows()
        if self.k > 1:
            self.graphs = DraftGraphs(self, seq_sizes, -(-max_model_len // self.block_size), target_ids)
            self.graphs.capture()

    @torch.inference_mode()
    def _warm_up_eager_prompt_chunks(self, graphed: int) -> None:
        """Prompt chunks over `graphed` tokens run the first pass eagerly, with prefill tiles that no
        capture compiled when the draft's heads differ from the target's (a draft LM): one pass of
        each new kernel shape now, over one sequence with no KV slots (nothing written), so the first
        long prompt compiles nothing while every request waits."""
        source = self.proposer.target_hidden
        sizes = [s for s in piecewise_sizes(self.max_tokens) if s > graphed]
        if not sizes:
            return
        ids = torch.zeros(sizes[-1], dtype=torch.long, device=self.device)
        slots = torch.full_like(ids, -1)
        hidden = self.aux_hidden if source == "aux" else None if source is None else \
            torch.zeros(sizes[-1], self.net.spec.hidden_size, dtype=self.dtype, device=self.device)

        def setup(size: int) -> None:
            self.backend.plan(ForwardBatch(ids[:size], ids[:size], slots[:size], [size], [size], [[]], ids[:0], size))

        def run(size: int) -> None:
            with forward_context(self.backend):
                self.net(ids[:size], ids[:size], None if hidden is None else hidden[:size])

        warm_up_kernel_shapes(self.backend, sizes, setup, run)

    @torch.inference_mode()
    def _warm_up_eager_decode_rows(self) -> None:
        """Decode rows run eagerly in two cases: a first pass of more rows than the largest first-pass
        graph (a draft LM reads one more row per request), and the k-1 decode steps after an eager
        first pass (a prompt chunk over the prefill graphs), over the step's sampling requests. The
        decode kernel's split count follows the row count: one step of each split count now, up to
        the most rows a step has (at the first row count of each), each row of length 1 in block 0 with
        no KV slot (nothing written), so no such step compiles while every request waits."""
        ids = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        lens, slots = torch.ones_like(ids), torch.full_like(ids, -1)
        carry = None if self.proposer.target_hidden is None else \
            torch.zeros(self.max_rows, self.net.spec.hidden_size, dtype=self.dtype, device=self.device)

        def setup(size: int) -> None:
            self.backend.plan_decode([[]] * size)
            self.backend.set_decode_lens(lens[:size], slots[:size])

        def run(size: int) -> None:
            with forward_context(self.backend):
                self.net(ids[:size], ids[:size], None if carry is None else carry[:size])

        warm_up_kernel_shapes(self.backend, fewest_rows_of_decode_shapes(self.backend, range(1, self.max_rows + 1)),
                              setup, run)

    # ---- host: what the device work of a step reads ------------------------------------

    def stage(self, layout: list[tuple], num_target_tokens: int, num_samples: int, decode_rows: bool = False,
              draft_len: int = 1, deferred: Deferred | None = None) -> StagedDraft:
        """`layout`: per scheduled request (request, first target row, tokens, drafts verified,
        first sampler row or None), in batch order. `decode_rows`: every target token samples, so
        every first-pass row attends as a decode row of its own. `draft_len`: the most drafts a
        request may take next step (StagedDraft.draft_len). `deferred`: the target step's inputs
        filled in on the device; the rows of requests whose positions move there move likewise."""
        bs, k, shift = self.block_size, self.k, self.shift
        sources, positions, slots, known = [], [], [], []
        position_pieces, slot_pieces = [], []  # the lists above, between the arrays of long chunks
        query_lens, seq_lens, tables = [], [], []
        requests, dec_tables = [], []
        moved = []  # rows whose positions move on the device (deferred.rows_of)
        known_base = num_target_tokens + num_samples
        for req, start, n, m, first_sample in layout:
            begin = req.num_computed_tokens
            row0 = len(sources)
            if deferred is not None and req in deferred.bases:
                moved += deferred.rows_of(req, row0, begin, n + shift)
            if shift:  # a draft LM re-reads the step's first token at its own position
                sources.append(start)
            # row i reads the step's next input token, start + i + 1, up to the request's last
            # known token; the m + 1 rows from there (its last token, its drafts: n > m) read its samples
            if first_sample is not None:
                sources += range(start + 1, start + n - m)
                sources += range(num_target_tokens + first_sample, num_target_tokens + first_sample + m + 1)
            else:  # a chunk that does not reach the end: its last row reads the next prompt token, known
                sources += range(start + 1, start + n)
                nxt = begin + n
                known.append(req.all_token_ids[nxt] if nxt < len(req.all_token_ids) else 0)
                sources.append(known_base + len(known) - 1)
            if n >= LONG_CHUNK and not m:
                position_pieces += (positions, np.arange(begin, begin + n + shift))
                slot_pieces += (slots, kv_slot_array(req.block_ids, begin, begin + n + shift, bs))
                positions, slots = [], []
            else:
                positions += range(begin, begin + n + shift)
                slots += kv_slots(req.block_ids, begin, begin + n + shift, bs)
            query_lens.append(n + shift)
            seq_lens.append(begin + n + shift)
            tables.append(req.block_ids)
            if first_sample is not None:
                requests += [row0 + shift + n - 1 - m, len(req.block_ids) * bs]
                requests += [start + 1 + j for j in range(m)] + [-1] * (k - m)
                requests += [first_sample + min(j, m) for j in range(k)]
                dec_tables.append(req.block_ids)
        if decode_rows:  # no long chunk samples every row: `positions` holds them all
            assert not position_pieces
            query_lens, seq_lens, tables = as_decode_rows(positions, query_lens, tables)
        width = max((len(t) for t in dec_tables), default=1) or 1
        padded = (self.graphs.padded_size(len(dec_tables)) if self.graphs is not None else None) or len(dec_tables)
        requests += ([0, 0] + [-1] * k + [0] * k) * (padded - len(dec_tables))
        parts = [sources, known or [0], Pieces((*position_pieces, positions)), Pieces((*slot_pieces, slots)), requests,
                 [b for t in dec_tables for b in t + [-1] * (width - len(t))], [x for r in moved for x in r]]
        views = to_device_parts(parts, torch.long, self.uploads)  # one copy
        staged = StagedDraft(views[0], views[1], views[2], views[3], query_lens, seq_lens, tables, num_target_tokens,
                             views[4].view(-1, 2 + 2 * k), views[5].view(-1, width), dec_tables, decode_rows,
                             draft_len, any(m for _, _, _, m, _ in layout))
        if moved:  # such a step decodes only: every row is a decode row, its context its position + 1
            deferred.move(staged.positions, staged.slots, views[6].view(-1, 3))
            staged.device_seq_lens = staged.positions + 1
        return staged

    # ---- device: the draft's forwards -------------------------------------------------

    @torch.inference_mode()
    def propose(self, staged: StagedDraft, target_ids: torch.Tensor, samples: torch.Tensor,
                target_hidden: torch.Tensor) -> torch.Tensor | None:
        """[B, k] drafts (target vocabulary ids) for the step after this one, per sampling request
        (None when nobody samples). `target_ids`: the target step's input ids (the runner's static
        buffer); `target_hidden`: its final hidden states."""
        T = staged.num_target_tokens
        ids = torch.cat([target_ids[:T], samples, staged.known])[staged.sources]
        source = {"final": target_hidden, "aux": self.aux_hidden, None: None}[self.proposer.target_hidden]
        hidden = None if source is None else source[:T]
        normed, carry, replayed = self._first_pass(staged, ids, hidden)
        self.accepted = None
        num = len(staged.decode_tables)
        if not num:
            return None
        if not staged.draft_len:  # the pass only filled the draft's KV; the next step may read the acceptance
            if staged.verifying:
                self.accepted = self._accepted(target_ids, samples, staged.requests[:num])
            return None
        steps = self.k > 1 and staged.draft_len > 1
        size = self.graphs.padded_size(num) if steps and replayed and self.graphs is not None else None
        if size is not None:
            drafts, accepted = self.graphs.replay(staged, num, size, samples)
        else:
            if steps:
                self.backend.plan_decode(staged.decode_tables)
            drafts, accepted = self._draft(normed, carry, staged.positions, target_ids, samples,
                                           staged.requests[:num], staged.tables, steps)
        # the next step, planned before this one is read back, moves by it
        self.accepted = accepted if staged.verifying else None
        return drafts

    def _first_pass(self, staged: StagedDraft, ids: torch.Tensor, hidden: torch.Tensor | None) -> tuple:
        """(normed, carried hidden, whether a graph ran it: its outputs are then in the static
        FirstPassBuffers) of the first pass over the step's rows; no outputs when nobody drafts
        next and the rows are decode rows (only the draft's KV is written: a head's q, attention,
        MLP and norm are skipped)."""
        kv_only = not staged.draft_len and staged.decode_rows
        graphs = self.kv_fill_graphs if kv_only else self.first_pass_graphs if staged.decode_rows \
            else self.prefill_graphs
        size = graphs.padded_size(ids.shape[0]) if graphs is not None else None
        if size is not None:
            out = graphs.replay(staged, size, ids, hidden)
            return (None, None, True) if kv_only else (*out, True)
        batch = ForwardBatch(ids, staged.positions, staged.slots, staged.query_lens, staged.seq_lens,
                             staged.block_tables, staged.positions[:0], ids.shape[0],
                             device_seq_lens=staged.device_seq_lens)
        self.backend.plan(batch)
        with forward_context(self.backend):
            if kv_only:
                self.net.fill_kv(ids, staged.positions, hidden)
                return None, None, False
            return (*self.net(ids, staged.positions, hidden), False)

    def _draft(self, normed, carry, positions, target_ids, samples, requests, tables, steps: bool) -> tuple:
        """([B, k] drafts, or [B, 1] without the k-1 `steps`; [B] drafts accepted) after the first
        pass (eager, or inside a graph's capture). `requests`: StagedDraft.requests; `normed`,
        `carry` and `positions`: the first pass's rows."""
        accepted = self._accepted(target_ids, samples, requests)
        rows = requests[:, 0] + accepted
        tokens = self._argmax(normed[rows])
        if not steps:
            return tokens[:, None], accepted
        later = self._decode_steps(tokens, positions[rows], None if carry is None else carry[rows], requests[:, 1],
                                   tables)
        return torch.stack([tokens, *later], dim=1), accepted

    def _accepted(self, target_ids, samples, requests) -> torch.Tensor:
        """[B] how many leading drafts of each request the target's samples confirm (0 when it
        verified none: its draft rows are -1)."""
        targets, sample_rows = requests[:, 2:2 + self.k], requests[:, 2 + self.k:]
        drafted = target_ids[targets.clamp(min=0)]
        return accepted_prefix((samples[sample_rows] == drafted) & (targets >= 0))

    def _decode_steps(self, tokens, positions, carry, capacity, tables) -> list[torch.Tensor]:
        """The k-1 draft steps after the first draft (eager, or inside a graph's capture). The
        backend's block tables are already planned; each step sets the lengths and slots."""
        drafts = []
        for _ in range(self.k - 1):
            positions = positions + 1
            inside = positions < capacity
            column = (positions // self.block_size).clamp(max=tables.shape[1] - 1)
            block = tables.gather(1, column[:, None])[:, 0]
            slots = torch.where(inside & (block >= 0), block * self.block_size + positions % self.block_size, -1)
            self.backend.set_decode_lens(torch.minimum(positions + 1, capacity), slots)
            with forward_context(self.backend):
                normed, carry = self.net(tokens, positions, carry)
            tokens = self._argmax(normed)
            drafts.append(tokens)
        return drafts

    def _argmax(self, normed: torch.Tensor) -> torch.Tensor:
        return self.net.to_target_ids(self.net.compute_logits(normed).argmax(dim=-1))


class DraftGraphs(SizeLadder):
    """CUDA graphs of a step's drafting after the first pass, one per number of sampling requests
    (a ladder): how many of the drafts just verified the target accepted, the first draft from the
    row of the first rejected one, and the k-1 decode steps (the draft's own graphs, in their own
    memory pool). They read the first pass's static buffers, the target's input ids (the runner's
    static buffer) and, copied into their own buffers before a replay, the staged per-request rows,
    block tables and the target's samples. Padding rows have no allocated positions, so they write
    no KV and attend to nothing."""

    def __init__(self, drafter: Drafter, sizes: list[int], width: int, target_ids: torch.Tensor):
        super().__init__(sizes)
        self.drafter = drafter
        self.target_ids = target_ids
        d, n, k = drafter.device, self.max_size, drafter.k
        self.requests = torch.zeros(n, 2 + 2 * k, dtype=torch.long, device=d)
        self.requests[:, 2:2 + k] = -1
        self.tables = torch.full((n, width), -1, dtype=torch.long, device=d)
        self.samples = torch.zeros(drafter.max_tokens, dtype=torch.long, device=d)

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        drafter, first = self.drafter, self.drafter.first_pass_buffers

        def run(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            return drafter._draft(first.normed, first.carry, first.positions, self.target_ids, self.samples,
                                  self.requests[:size], self.tables[:size], steps=True)

        self.graphs, self.report = self.capture_ladder(lambda size: drafter.backend.plan_decode([[]] * size), run,
                                                       "draft decode batch size", drafter.backend)
        return self.report

    def replay(self, staged: StagedDraft, num: int, size: int, samples: torch.Tensor) -> tuple:
        """([num, k] drafts, [num] drafts accepted), after a first pass that a graph ran. A real
        request's table columns past its own are stale: its positions there are past its capacity,
        so they get no slot."""
        self.drafter.backend.plan_decode(staged.decode_tables + [[]] * (size - num))
        self.requests[:size].copy_(staged.requests)  # staged padded to this size
        self.tables[:num, :staged.tables.shape[1]].copy_(staged.tables)
        self.samples[:samples.shape[0]].copy_(samples)
        drafts, accepted = self.replay_graph(size)
        return drafts[:num], accepted[:num]


@dataclass
class FirstPassBuffers:
    """The static inputs and outputs of every first-pass graph, shared by all its capture modes so
    that the draft graphs after it read one place. `hidden`: EAGLE-3's aux buffer, or the
    target's final states copied in; `carry`: a head's pre-norm output (None for a draft LM)."""
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    hidden: torch.Tensor | None
    normed: torch.Tensor
    carry: torch.Tensor | None

    @classmethod
    def allocate(cls, drafter: Drafter, n: int) -> FirstPassBuffers:
        d, hidden_size, source = drafter.device, drafter.net.spec.hidden_size, drafter.proposer.target_hidden
        states = lambda: torch.zeros(n, hidden_size, dtype=drafter.dtype, device=d)
        hidden = drafter.aux_hidden if source == "aux" else states() if source == "final" else None
        return cls(torch.zeros(n, dtype=torch.long, device=d), torch.zeros(n, dtype=torch.long, device=d),
                   torch.full((n,), -1, dtype=torch.long, device=d), hidden, states(),
                   states() if source is not None else None)


class FirstPassGraphs(SizeLadder):
    """CUDA graphs of the draft's first pass, in capture modes of their own:

    - decode rows (keyed by row count): steps whose every target token samples (decode and
      verify steps); each row attends as a decode row, so the captured decode kernel serves any
      mix of positions;
    - prefill (keyed by token count, up to DRAFT_PREFILL_GRAPH_MAX_TOKENS): prompt chunks, with
      the prefill kernel inside the graph, its grid planned for any step of that many tokens
      (`graph_tokens`, kernels/attention/prefill.py);
    - KV fill (decode rows, keyed by row count): steps after which nobody drafts (all paused),
      where the pass only writes the draft's KV (`fill_kv`: a head's k and v projections alone).

    Inputs are copied into static buffers before a replay; padding rows (slot -1) write no KV and
    their outputs are never read."""

    def __init__(self, drafter: Drafter, sizes: list[int], prefill: bool = False, kv_only: bool = False):
        super().__init__(sizes)
        self.drafter = drafter
        self.prefill = prefill
        self.kv_only = kv_only
        self.buffers = drafter.first_pass_buffers

    def _plan(self, size: int, query_lens: list[int], seq_lens: list[int], tables: list[list[int]],
              device_seq_lens: torch.Tensor | None = None) -> None:
        b = self.buffers
        batch = ForwardBatch(b.ids[:size], b.positions[:size], b.slots[:size], query_lens, seq_lens,
                             tables, b.positions[:0], sum(query_lens), device_seq_lens=device_seq_lens)
        if self.prefill:
            self.drafter.backend.plan(batch, graph_tokens=size)
        else:
            self.drafter.backend.plan(batch, num_padded_seqs=size)

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        net, backend = self.drafter.net, self.drafter.backend

        def setup(size: int) -> None:  # prefill: one sequence of `size` queries (the grid: `graph_tokens`)
            self._plan(size, *(([size], [size], [[]]) if self.prefill else ([], [], [])))

        def run(size: int) -> tuple | None:
            b = self.buffers
            inputs = b.ids[:size], b.positions[:size], None if b.hidden is None else b.hidden[:size]
            with forward_context(backend):
                if self.kv_only:
                    return net.fill_kv(*inputs)
                normed, carry = net(*inputs)
            # into the shared outputs, which the draft graphs read
            b.normed[:size].copy_(normed)
            if carry is None:
                return b.normed[:size], None
            b.carry[:size].copy_(carry)
            return b.normed[:size], b.carry[:size]

        what = "draft prefill tokens" if self.prefill else "draft KV fill rows" if self.kv_only \
            else "draft first pass rows"
        self.graphs, self.report = self.capture_ladder(setup, run, what, backend)
        return self.report

    def replay(self, staged: StagedDraft, size: int, ids: torch.Tensor, hidden: torch.Tensor | None) -> tuple:
        """(normed, carried hidden) of the first pass, padding rows included (views of the
        FirstPassBuffers)."""
        num, b = ids.shape[0], self.buffers
        b.ids[:num].copy_(ids)
        b.positions[:num].copy_(staged.positions)
        b.slots[:num].copy_(staged.slots)
        b.slots[num:size].fill_(-1)
        if hidden is not None and hidden.data_ptr() != b.hidden.data_ptr():
            b.hidden[:num].copy_(hidden)
        self._plan(size, staged.query_lens, staged.seq_lens, staged.block_tables, staged.device_seq_lens)
        return self.replay_graph(size)
