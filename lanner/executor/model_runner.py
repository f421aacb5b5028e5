"""ModelRunner: owns the model, the KV-cache tensors, the attention backend, the
decode CUDA graphs and the sampler, and runs one scheduled step: stage the
batch into static buffers, plan attention, run the model (graph or eager),
compute the needed logits, sample."""
from __future__ import annotations

import importlib.util
import logging
import math
from contextlib import nullcontext

import numpy as np
import torch

from lanner.config import WHOLE_FORWARD_MAX_TOKENS, EngineConfig, MoEConfig
from lanner.core.batch import LONG_CHUNK, ForwardBatch, as_decode_rows, kv_slot_array, kv_slots
from lanner.core.profiling import step_range
from lanner.core.request import Request
from lanner.core.schedule import SchedulerOutput
from lanner.core.transfer import PinnedRing, Views, to_device, write_pieces
from lanner.distributed import whole_on_every_rank
from lanner.errors import ConfigError
from lanner.executor.advance import DecodeRun, advance, decode_run
from lanner.executor.deferred import Deferred
from lanner.executor.drafter import Drafter
from lanner.executor.gemv_table import assign_gemv_kernels
from lanner.executor.graphs import DecodeGraphs, decode_graph_sizes, fewest_rows_of_decode_shapes, verify_graph_sizes
from lanner.executor.kv_tensors import allocate_kv_caches, kv_block_bytes, kv_cache_element_type
from lanner.executor.piecewise import PiecewiseGraphs, piecewise_sizes
from lanner.executor.step_handle import RunnerOutput, StepHandle, StepTimes, first_rows
from lanner.executor.worker import min_over_ranks
from lanner.kernels.attention.reference import FP8_KV_DTYPE
from lanner.layers.attention import forward_context
from lanner.models.llama import DecoderAttention
from lanner.models.loader import LoadedModel
from lanner.sampling.penalties import PenaltyCounts
from lanner.sampling.sampler import GrammarMask, Sampler, prompt_logprobs
from lanner.sampling.speculative import DraftContext, ModelProposer, Proposer

logger = logging.getLogger(__name__)

# verify steps of up to this many rows replay decode graphs (beyond it a step is compute-bound, and
# every graph size costs capture time and a logits buffer row)
MAX_VERIFY_GRAPH_ROWS = 512
LOGITS_ROW_BUCKET = 16  # the LM head outside graphs sees row counts in steps of this (ForwardBatch)
PENDING_ROW = 5  # ModelRunner.staged's rows from here: plain overlap's pending-token rows, then their sample rows
# what pads each staged row past its values: slots -1 (write no KV), the rest 0
STAGED_PADDING = np.array([0, 0, -1, 0, 0, 0, 0])[:, None]


def require_triton(what: str) -> None:
    """Triton is a dependency of the GPU path only: the CPU path never imports it."""
    if importlib.util.find_spec("triton") is None:
        raise ConfigError(f"{what} needs the 'triton' package, which is not installed: pip install triton "
                          "(or run on the CPU: --device cpu)")


def build_runner(config: EngineConfig, loaded: LoadedModel, path: str, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, proposer: Proposer | None) -> ModelRunner:
    """The model runner, with a drafter when `proposer` (from the speculative config) is a model
    proposer; every tensor-parallel rank builds its runner here (executor/worker.py)."""
    draft = (proposer, DraftContext(loaded.model, path, loaded.tokenizer, config.model.load_format, dtype, device,
                                    config.seed)) if isinstance(proposer, ModelProposer) else None
    return ModelRunner(config, loaded, device, dtype, max_model_len, draft, proposer.k if proposer else 0)


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, draft: tuple[ModelProposer, DraftContext] | None = None,
                 num_speculative_tokens: int = 0):
        if device.type == "cuda" or config.graphs.attention_backend == "triton":
            require_triton(f"the GPU path (device {device}, attention backend {config.graphs.attention_backend})")
        self.config = config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_cache_element_type(config.cache.kv_cache_dtype, dtype)
        self._check_fp8_kv_runs_here()
        self.model = loaded.model
        self.kv_scales = self._kv_cache_scales()
        self.max_model_len = max_model_len
        self.block_size = config.cache.block_size
        sched = config.scheduler
        self.max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
        # a step whose every token samples (decode, and verify: a request's last token and its drafts)
        # attends one row per token, so attention plans hold up to this many rows
        self.max_decode_rows = min(self.max_tokens, sched.max_num_seqs * (1 + num_speculative_tokens))
        self.num_speculative_tokens = num_speculative_tokens
        # the staged inputs, a row each: input ids, positions, KV slots, logits rows, the real token
        # count, and with plain overlap where each request's last sampled token goes and where it
        # was sampled (executor/deferred.py); a step's columns arrive in one copy (`_stage`), the
        # graphs read fixed rows
        self.staged = torch.zeros(PENDING_ROW + 2, self.max_tokens, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.logits_indices = self.staged[:4]
        self.slot_mapping.fill_(-1)
        self.num_real_tokens = self.staged[4, :1]
        self._staged_views = Views()
        self.num_stages = 0  # stagings so far: one since a DecodeRun was recorded overwrote its inputs
        # the last decode step, which the next may advance on the device (executor/advance.py); tests
        # and timings switch `advance_decodes` off to stage every step
        self.decode_run: DecodeRun | None = None
        self.advance_decodes = True
        self.num_advanced_steps = 0
        self.last_sampled = torch.zeros(sched.max_num_seqs, dtype=torch.long, device=device)
        # the last step's drafts accepted and drafts proposed per sampling request (a drafter's)
        self.last_accepted: torch.Tensor | None = None
        self.last_proposed: torch.Tensor | None = None
        self.uploads = PinnedRing(device)  # the staged inputs' host side
        self.deferred_uploads = PinnedRing(device)
        self.sampler = Sampler()
        self.reads_back = True  # False on tensor-parallel ranks > 0: nothing reads their results (logprobs)
        self.drafter = self._make_drafter(*draft) if draft is not None else None
        self.moe = getattr(self.model.model, "moe_runtime", None)  # shared by the model's MoE layers
        if self.moe is not None:
            self._setup_moe(config)
        elif config.moe != MoEConfig():
            raise ConfigError(f"MoE options {config.moe} given, but this model has no MoE layers")
        gc = config.graphs
        self._set_dependent_launch(gc.dependent_launch)
        self.gemv_report = self._choose_gemv_kernels(gc.gemv_kernels)
        cuda_graphs = device.type == "cuda" and not gc.enforce_eager
        # the KV cache gets what is left after a worst-case step and the graphs: measure the step
        # first (its rows all real, the decode graphs' logits buffer already allocated), then capture
        # the pieces, then size; the decode and whole-forward graphs, captured over the cache, share
        # the pieces' memory pool
        self.decode_logits = self._decode_logits_buffer() if cuda_graphs else None
        peak = self.profile_peak_memory() if self._sizing_kv_from_memory() else 0
        if self.moe is not None:
            self.moe.num_real_tokens = self.num_real_tokens
        whole_forward_max_tokens = self._whole_forward_max_tokens()
        self.piecewise: PiecewiseGraphs | None = None
        self.piecewise_token_sizes: list[int] = []
        before_pieces = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
        if gc.piecewise_graphs or (gc.piecewise_graphs is None and cuda_graphs):
            self.piecewise_token_sizes = piecewise_sizes(min(gc.piecewise_max_tokens, sched.max_num_batched_tokens),
                                                         gc.piecewise_sizes)
            self.piecewise = PiecewiseGraphs(self.model, self.piecewise_token_sizes, dtype, device,
                                             full_max_tokens=whole_forward_max_tokens)
            if cuda_graphs:
                self.piecewise.capture(self.input_ids, self.positions)
        pieces_bytes = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the warm-up's activations: not the pieces' memory
            pieces_bytes = torch.cuda.memory_reserved(device) - before_pieces
        self.num_blocks = min_over_ranks(self._num_kv_blocks(peak, pieces_bytes))  # every rank holds the same
        self.kv_caches = allocate_kv_caches(self.model.spec, self.num_blocks, self.block_size, self.kv_dtype, device)
        self.backend = self._make_backend(self.kv_caches, kv_scales=self.kv_scales)
        if self.drafter is not None:
            self.drafter.allocate(self.num_blocks, self._make_backend,
                                  self.max_decode_rows + self.drafter.shift * sched.max_num_seqs)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size)
        self.graphs: DecodeGraphs | None = None
        self.step_times: StepTimes | None = None  # set to a StepTimes to time steps on the GPU
        self.num_verify_graph_steps = 0  # verify steps that replayed a decode graph
        if cuda_graphs:
            self.capture_graphs(self.piecewise_token_sizes)
        self.sampler.warm_up(self.model.spec.vocab_size, device)

    def capture_graphs(self, draft_prefill_sizes: list[int]) -> None:
        """The full decode graphs (batch sizes, and B x (k+1) rows of verify steps) and the draft's
        own graphs; the draft's prompt chunks replay graphs only where the target's do (piecewise
        on): `draft_prefill_sizes`."""
        sched = self.config.scheduler
        sizes, rows = self._decode_graph_rows()
        if self.decode_logits is None:  # tests capture on the CPU (eagerly)
            self.decode_logits = self._decode_logits_buffer()
        self.graphs = DecodeGraphs(self, rows)
        pool = self.piecewise.pool if self.piecewise is not None else None  # counted in the KV sizing
        self.graphs.capture(self.decode_logits, pool)
        if self.piecewise is not None:
            self.piecewise.capture_full(self.input_ids, self.positions, self.slot_mapping, self.backend)
        self._warm_up_decode_steps_over_graphs(rows)
        if self.drafter is not None:
            self.drafter.capture(sizes, rows, draft_prefill_sizes, self.max_model_len, sched.max_num_seqs,
                                 self.input_ids)

    @torch.inference_mode()
    def _warm_up_decode_steps_over_graphs(self, graph_rows: list[int]) -> None:
        """Decode-only steps of more rows than the largest decode graph (verify steps of many requests,
        a short `cuda_graph_sizes`) run outside the graphs, with decode attention's split count following
        their row count: one such step (empty rows, no KV written) of each split count no graph
        compiled, at start, so that none compiles in a step while every request waits."""
        compiled = {self.backend.decode_kernel_shape(rows) for rows in graph_rows}
        over = range(max(graph_rows) + 1, self.max_decode_rows + 1)
        with self.piecewise.uncounted() if self.piecewise is not None else nullcontext():
            for rows in fewest_rows_of_decode_shapes(self.backend, over, compiled):
                self.run_model(self.dummy_decode_batch(rows))

    def _decode_graph_rows(self) -> tuple[list[int], list[int]]:
        """The decode graphs' batch sizes, and their row counts (each size x (1 + k) for verify steps)."""
        sched = self.config.scheduler
        sizes = decode_graph_sizes(sched.max_num_seqs, self.config.graphs.cuda_graph_sizes)
        return sizes, verify_graph_sizes(sizes, 1 + self.num_speculative_tokens,
                                         min(self.max_decode_rows, max(sched.max_num_seqs, MAX_VERIFY_GRAPH_ROWS)))

    def _decode_logits_buffer(self) -> torch.Tensor:
        """The one logits buffer of every decode graph: [their most rows, vocab]."""
        return torch.empty(max(self._decode_graph_rows()[1]), self.model.spec.vocab_size, dtype=self.dtype,
                           device=self.device)

    def _set_dependent_launch(self, choice: bool | None) -> None:
        """Programmatic dependent launch for the Triton kernels (kernels/pdl.py), before the GEMV
        table's measurement, which times launches as the model makes them."""
        from lanner.kernels import set_dependent_launch

        able = False
        if self.device.type == "cuda":
            from lanner.kernels.pdl import supported  # imports Triton: the GPU path only

            able = supported(self.device)
        if choice and not able:
            raise ConfigError("dependent_launch needs an NVIDIA GPU of compute capability 9.0 or newer and Triton 3.4+")
        # set on every engine: one on a GPU may have turned it on in this process
        set_dependent_launch(able if choice is None else choice)

    def _choose_gemv_kernels(self, choice: str) -> dict | None:
        """Point the model's small-batch matmuls at the Triton GEMV where it wins on this GPU
        (executor/gemv_table.py); before the memory profile, so its measurement's buffers are gone."""
        if choice == "cublas" or (choice == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda":
            raise ConfigError("gemv_kernels 'triton' runs on CUDA only (the CPU path multiplies with torch)")
        return assign_gemv_kernels(self.networks(), self.dtype, self.device, force=choice == "triton")

    def networks(self) -> list[torch.nn.Module]:
        """The networks that run here: the target, and a drafter's own (a draft model, a head)."""
        return [self.model] + ([self.drafter.net] if self.drafter is not None else [])

    def _setup_moe(self, config: EngineConfig) -> None:
        """The MoE layers' executor settings; the routing record when requests may ask for it."""
        self.moe.backend, self.moe.masked_max_tokens = config.moe.moe_backend, config.moe.moe_masked_max_tokens
        if config.moe.enable_return_routed_experts:
            spec = self.model.spec.moe
            self.moe.routing = torch.full((self.max_tokens, len(spec.sparse_layers), spec.router.top_k), -1,
                                          dtype=torch.int32, device=self.device)

    @property
    def routing(self) -> torch.Tensor | None:
        """The MoE layers' routing record ([tokens, MoE layers, top_k]), when the engine keeps one."""
        return None if self.moe is None else self.moe.routing

    def _whole_forward_max_tokens(self) -> int:
        """The largest whole-forward graph: the attention kernels must be capturable (Triton's)."""
        asked = self.config.graphs.prefill_graph_max_tokens
        if self._backend_kind() == "triton":
            return WHOLE_FORWARD_MAX_TOKENS if asked is None else asked
        if asked:
            raise ConfigError(f"prefill_graph_max_tokens={asked} needs the Triton attention backend (a CUDA device, "
                              f"attention_backend auto or triton); pass 0 or leave it unset")
        return 0

    def _check_fp8_kv_runs_here(self) -> None:
        """Triton has e4m3 from compute capability 8.9 (Ada, Hopper) on, and its CPU interpreter
        rounds some values into it wrongly (-7.9 to -4): refuse rather than crash or corrupt."""
        if self.kv_dtype != FP8_KV_DTYPE or self._backend_kind() != "triton":
            return
        if self.device.type != "cuda":
            raise ConfigError("kv_cache_dtype fp8 with the Triton attention backend needs a GPU (the CPU interpreter "
                              "rounds fp8 wrongly); on the CPU use attention_backend torch")
        capability = torch.cuda.get_device_capability(self.device)
        if capability < (8, 9):
            raise ConfigError(f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                              f"{torch.cuda.get_device_name(self.device)} is {capability[0]}.{capability[1]}")

    def _backend_kind(self) -> str:
        choice = self.config.graphs.attention_backend
        return "triton" if choice == "triton" or (choice == "auto" and self.device.type == "cuda") else "torch"

    def _make_backend(self, kv_caches, num_heads: int | None = None, max_rows: int | None = None,
                      kv_scales: list[tuple[float, float]] | None = None):
        """An attention backend over `kv_caches`; `kv_scales`: the target's (a draft's cache has none)."""
        if self._backend_kind() == "triton":
            from lanner.layers.attention.triton_backend import TritonAttentionBackend

            # tokens: a draft LM's steps read one more per request than the target's (one bound for both)
            return TritonAttentionBackend(kv_caches, self.block_size, max_rows or self.max_decode_rows,
                                          self.max_model_len, num_heads or self.model.spec.num_heads,
                                          self.max_tokens + self.config.scheduler.max_num_seqs, kv_scales)
        from lanner.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(kv_caches, self.block_size, kv_scales)

    def _kv_cache_scales(self) -> list[tuple[float, float]] | None:
        """Per layer, the (k_scale, v_scale) the checkpoint gives its fp8 KV cache (1.0 where it gives
        none). A cache of the model's dtype holds values exactly and takes no scales: a checkpoint's
        are then left unused, with a warning."""
        layers = sorted((m for m in self.model.modules() if isinstance(m, DecoderAttention)),
                        key=lambda m: m.attn.layer_idx)
        scales = [(float(m.k_scale), float(m.v_scale)) for m in layers]
        for i, pair in enumerate(scales):
            if not all(math.isfinite(x) and x > 0 for x in pair):
                raise ConfigError(f"layer {i}'s KV-cache scales (k_scale, v_scale) = {pair}: they must be finite "
                                  "and positive")
        if self.kv_dtype == FP8_KV_DTYPE:
            return scales
        if any(pair != (1.0, 1.0) for pair in scales):
            logger.warning("the checkpoint's KV-cache scales (k_scale, v_scale) are used only with "
                           "kv_cache_dtype fp8; this cache is %s", self.kv_dtype)
        return None

    def _make_drafter(self, proposer: ModelProposer, ctx: DraftContext) -> Drafter:
        with whole_on_every_rank():  # under tensor parallelism every rank runs the whole draft
            net = proposer.load(ctx)
        return Drafter(proposer, net, self.model, self.max_tokens, self.block_size, self.device, self.dtype)

    # ---- KV cache sizing ----------------------------------------------------------

    def _block_bytes(self) -> int:
        """Bytes of one KV block, the draft's share included."""
        draft = self.drafter.block_bytes() if self.drafter is not None else 0
        return kv_block_bytes(self.model.spec, self.block_size, self.kv_dtype) + draft

    def _sizing_kv_from_memory(self) -> bool:
        return self.config.cache.num_kv_blocks is None and self.device.type == "cuda"

    def _num_kv_blocks(self, peak: int, pieces_bytes: int) -> int:
        """Blocks that fit in gpu_memory_utilization of the GPU after the peak of a worst-case step
        (weights included), the piecewise graphs' pool and buffers, and what other processes and
        CUDA itself hold. (The decode graphs, captured over the cache, come after: tens of MiB.)"""
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type != "cuda":
            return max(int(cache.kv_cache_memory_gib * (1 << 30) // self._block_bytes()), 1)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = total * cache.gpu_memory_utilization - peak - pieces_bytes - non_torch
        blocks = int(budget // self._block_bytes())
        logger.info("memory: total %.1f GiB, peak of a worst-case step %.2f GiB, piecewise graphs %.2f GiB, "
                    "other processes/CUDA %.2f GiB -> %.2f GiB for the KV cache", total / 2**30, peak / 2**30,
                    pieces_bytes / 2**30, non_torch / 2**30, blocks * self._block_bytes() / 2**30)
        if blocks < 1:
            raise ConfigError("no GPU memory left for the KV cache: lower max_num_batched_tokens or raise "
                              "gpu_memory_utilization")
        return blocks

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Peak memory (weights included) of the largest step: a full token budget of
        prefill, then logits and sampling for max_num_seqs rows (with their penalty counts).
        The throwaway KV cache it needs is left out of the figure."""
        sched = self.config.scheduler
        tokens = sched.max_num_batched_tokens
        seqs = min(sched.max_num_seqs, tokens)
        lens = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
        blocks_per_seq = -(-max(lens) // self.block_size)
        # zeros: the pass attends over these blocks, and garbage there (NaN) would reach a MoE router
        caches = allocate_kv_caches(self.model.spec, seqs * blocks_per_seq, self.block_size, self.kv_dtype,
                                    self.device)
        cache_bytes = sum(k.nbytes + v.nbytes for k, v in caches)
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(seqs)]
        batch = ForwardBatch(self.input_ids[:tokens], self.positions[:tokens], self.slot_mapping[:tokens], lens,
                             lens, tables, torch.arange(seqs, device=self.device), tokens)
        backend = self._make_backend(caches, kv_scales=self.kv_scales)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        backend.plan(batch)
        with forward_context(backend):
            hidden = self.model(batch.input_ids, batch.positions)
        logits = self.model.compute_logits(hidden[:seqs]).float()
        counts = PenaltyCounts(logits.shape[1], self.device)  # max_num_seqs requests' rows stay allocated
        counts.reserve(seqs)
        logits.sort(dim=-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - cache_bytes
        del caches, backend, hidden, logits, counts
        torch.cuda.empty_cache()
        return peak

    # ---- one step -----------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, sample: bool = True) -> StepHandle:
        """Enqueue one step on the device (inputs, model, logits, sampling) without waiting
        for it; the handle reads the results back. A request's pending token from the
        previous launch is read on the device, so this may run before that step's results
        are back (overlap scheduling). With sample=False it stops after the forward, and
        `sample` enqueues the rest (structured outputs: their mask needs the tokens of the
        step before, read back while this forward runs)."""
        with step_range("prepare"):
            batch, samplers, offsets, prompt_rows, layout, deferred = self.prepare(sched)
            staged = self.drafter.stage(layout, batch.num_real_tokens, len(samplers), batch.is_decode_only,
                                        self._next_draft_len(samplers), deferred) if self.drafter else None
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] \
            if self.step_times is not None and self.device.type == "cuda" else None
        if events:
            events[0].record()
        with step_range("model"):
            logits, hidden = self.run_model(batch)
        handle = StepHandle(samplers, prompt_rows, (self.step_times, events) if events else None,
                            self._routing_rows(sched))
        handle.unsampled = (logits, hidden, offsets, deferred, staged, events)
        if sample:
            self.sample(handle)
        return handle

    @torch.inference_mode()
    def sample(self, handle: StepHandle, mask: tuple[torch.Tensor, list[int]] | None = None,
               late: bool = False) -> None:
        """Sampling (masked by structured outputs' (bitmask on the host, sampler rows)) and the
        drafter's work of a launched step. `late`: the step before was read back since this one
        was planned, so the host knows each request's output index (no shifts on the device)."""
        (logits, hidden, offsets, deferred, staged, events), handle.unsampled = handle.unsampled, None
        samplers, sampled, proposed = handle.samplers, None, None
        if samplers:  # their rows come first
            with step_range("sample"):
                shifts = (deferred.row_shift, deferred.spread) if deferred.shifts and not late else None
                grammar = None if mask is None else GrammarMask(to_device(mask[0], torch.int32, self.device),
                                                                 to_device(mask[1], torch.long, self.device))
                sampled = self.sampler(logits[:len(samplers)], samplers, self.last_sampled, offsets, shifts, grammar)
            for index, (req, row) in enumerate(first_rows(samplers).items()):
                req.sample_row, req.sample_index, req.num_verifying = row, index, len(req.draft_token_ids)
            self.last_sampled = sampled.tokens
        if events:
            events[1].record()
        if staged is not None:
            with step_range("draft"):
                samples = sampled.tokens if sampled is not None else self.input_ids[:0]
                proposed = self.drafter.propose(staged, self.input_ids, samples, hidden)
            self.last_accepted, self.last_proposed = self.drafter.accepted, proposed
        if events:
            events[2].record()
        scored = prompt_logprobs(logits, handle.prompt_rows) if handle.prompt_rows and self.reads_back else []
        handle.launched(sampled, proposed, self.device, scored)

    def _routing_rows(self, sched: SchedulerOutput) -> tuple[list, torch.Tensor] | None:
        """(request, first position, first row, rows) of each recording request's positions this
        step, and those rows of the routing record, gathered (the next step overwrites the record).
        Prompt positions are read only for requests that asked for them; the last prompt
        position's pass produces the first output token, so it is always read."""
        if self.routing is None:
            return None
        spans, rows, start = [], [], 0
        for req, n in sched.scheduled:
            if req.routed_experts is not None:
                begin = req.num_computed_tokens
                first = begin if req.params.return_prompt_routed_experts else max(begin, req.num_prompt_tokens - 1)
                if first < begin + n:
                    spans.append((req, first, len(rows), begin + n - first))
                    rows += range(start + first - begin, start + n)
            start += n
        if not spans:
            return None
        return spans, self.routing.index_select(0, to_device(rows, torch.long, self.device))

    def _next_draft_len(self, samplers: list[Request]) -> int:
        """The most drafts a sampling request of this step may take next step (its drafter's work)."""
        return max((r.max_drafts(self.drafter.k) for r in samplers), default=0)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """One step, synchronously."""
        return self.launch(sched).result()

    def run_model(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of the batch's logits_indices rows, and the hidden states of every row."""
        if self.graphs is not None and batch.is_decode_only:
            size = self.graphs.padded_size(batch.num_seqs)
            if size is not None:
                logits, hidden = self.graphs.replay(batch, size)
                self.num_verify_graph_steps += batch.verify_rows
                if batch.sampling_rows_are_tokens:
                    return logits[:batch.num_seqs], hidden
                return logits[batch.logits_indices], hidden
        if self.piecewise is not None:
            hidden = self.piecewise.forward(batch, self.backend)
        else:
            if not batch.planned:
                self.backend.plan(batch)
            with forward_context(self.backend):
                hidden = self.model(batch.input_ids, batch.positions)
        if batch.padded_logits_indices is None:
            return self.model.compute_logits(hidden[batch.logits_indices]), hidden
        rows = batch.logits_indices.shape[0]
        return self.model.compute_logits(hidden[batch.padded_logits_indices])[:rows], hidden

    def prepare(self, sched: SchedulerOutput):
        """Stage a step's tokens into the static buffers and return its ForwardBatch, plus
        who reads which logits rows:
        samplers: requests whose last token is computed now; row i is the i-th of them (a request
        with drafts has a row per draft and one after: offsets says which);
        prompt_rows: (request, first row, prompt tokens those rows predict);
        layout: per request (request, first row, tokens, drafts, first sampling row or None), for a drafter;
        deferred: the inputs filled in on the device from the step before (executor/deferred.py)."""
        advanced = advance(self, sched) if self.decode_run is not None and self.advance_decodes else None
        if advanced is not None:
            return advanced
        input_ids, positions, slots, sample_at, score_at = [], [], [], [], []
        # input ids, positions and slots in pieces: lists of the other requests' items, between the
        # arrays of long chunks
        input_pieces, position_pieces, slot_pieces = [], [], []
        samplers, prompt_rows = [], []
        deferred = Deferred(self.block_size, self.drafter.shift if self.drafter is not None else 0)
        bs = self.block_size
        start = 0
        offsets = []  # per sampling row: which token after the request's last one it samples
        layout = []
        for req, n in sched.scheduled:
            begin = req.num_computed_tokens
            drafts = req.draft_token_ids
            long = n >= LONG_CHUNK and not drafts
            if long and begin + n <= req.num_prompt_tokens:
                ids = req.prompt_array[begin:begin + n]
            else:
                ids = req.all_token_ids[begin:begin + n - len(drafts)]
                if len(ids) < n - len(drafts):  # the newest token is still on the device (sampled by the last launch)
                    deferred.add(req, start + len(ids), n - len(ids), len(drafts))
                    ids.append(0)
                ids += drafts  # the last token, then the drafts after it
            if long:
                input_pieces += (input_ids, ids)
                position_pieces += (positions, np.arange(begin, begin + n))
                slot_pieces += (slots, kv_slot_array(req.block_ids, begin, begin + n, bs))
                input_ids, positions, slots = [], [], []
            else:
                input_ids += ids
                positions += range(begin, begin + n)
                slots += kv_slots(req.block_ids, begin, begin + n, bs)
            if req.prompt_logprobs is not None:
                # positions whose logits predict prompt tokens not scored yet (a preempted
                # request recomputes its prompt but scores each token once)
                first = max(begin, len(req.prompt_logprobs) - 1)
                last = min(begin + n, req.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows.append((req, len(score_at), req.prompt_token_ids[first + 1:last + 1]))
                    score_at += range(start + first - begin, start + last - begin)
            first_sample = None
            if begin + n == req.num_tokens + len(drafts):  # one row per draft verified, and one after
                first_sample = len(samplers)
                samplers += [req] * (len(drafts) + 1)
                offsets += range(len(drafts) + 1)
                sample_at += range(start + n - 1 - len(drafts), start + n)
            layout.append((req, start, n, len(drafts), first_sample))
            start += n
        prompt_rows = [(req, row + len(sample_at), targets) for req, row, targets in prompt_rows]
        query_lens = [n for _, n in sched.scheduled]
        seq_lens = [req.num_computed_tokens + n for req, n in sched.scheduled]
        tables = [req.block_ids for req, _ in sched.scheduled]
        every_token_samples = not score_at and len(samplers) == start
        input_pieces.append(input_ids)
        position_pieces.append(positions)
        slot_pieces.append(slots)
        if every_token_samples and len(query_lens) < start:
            # a verify step: each row attends as a decode row of its own (its position + 1 keys),
            # so the step replays the decode graphs, padded like a decode batch (a long chunk samples
            # one of its rows, so none is here: `positions` holds them all)
            assert len(position_pieces) == 1
            query_lens, seq_lens, tables = as_decode_rows(positions, query_lens, tables)
        if deferred.shifts and not every_token_samples:
            raise RuntimeError("a step planned before its predecessor's accepted drafts were read back must "
                               "decode only (the engine reads back first otherwise)")
        pending = deferred.pending_rows() if deferred.plain else None
        batch = self._stage(input_pieces, position_pieces, slot_pieces, query_lens, seq_lens, tables,
                            sample_at + score_at, pending)
        batch.sampling_rows_are_tokens = every_token_samples
        batch.verify_rows = len(sched.scheduled) < len(query_lens)
        if deferred:
            staged_rows = (self.staged_view(PENDING_ROW, len(pending[0])),
                           self.staged_view(PENDING_ROW + 1, len(pending[0]))) if pending else None
            deferred.apply(self.input_ids, self.positions, self.slot_mapping, self.last_sampled,
                           self.last_accepted, self.last_proposed, start, self.deferred_uploads, staged_rows)
            if deferred.shifts:  # decode rows: a row's context is its position + 1
                batch.device_seq_lens = self.positions[:start] + 1
        self.decode_run = decode_run(self, sched, batch)
        return batch, samplers, offsets, prompt_rows, layout, deferred

    def _stage(self, input_pieces, position_pieces, slot_pieces, query_lens, seq_lens, block_tables, logits_indices,
               pending: tuple[list[int], list[int]] | None = None) -> ForwardBatch:
        """Stage a step's inputs in one copy; input ids, positions and slots come in pieces (lists, arrays)."""
        T = sum(len(piece) for piece in input_pieces)
        rows = self._padded_rows(T, query_lens)
        L = len(logits_indices)
        padded = min(-(-L // LOGITS_ROW_BUCKET) * LOGITS_ROW_BUCKET, self.max_tokens)
        cols = max(rows, padded)
        # the rows of self.staged after the three in pieces, in order (PENDING_ROW: the pending rows
        # come after the count)
        fields = [logits_indices, [T], *(pending or ())]
        host, view = self.uploads.take((3 + len(fields), cols), torch.long)
        self.num_stages += 1
        view[...] = STAGED_PADDING[:3 + len(fields)]  # one numpy call, not one a row: ~15 us of a batch-1 step
        for row, pieces in zip(view, (input_pieces, position_pieces, slot_pieces)):
            write_pieces(row, pieces)
        for row, values in zip(view[3:], fields):
            row[:len(values)] = values
        self.staged_view(0, cols, stop=3 + len(fields)).copy_(host, non_blocking=True)
        self.uploads.sent()
        return ForwardBatch(self.staged_view(0, rows), self.staged_view(1, rows), self.staged_view(2, rows), query_lens,
                            seq_lens, block_tables, self.staged_view(3, L), T,
                            num_real_tokens_device=self.num_real_tokens,
                            padded_logits_indices=self.staged_view(3, padded))

    def staged_view(self, first: int, cols: int, stop: int | None = None) -> torch.Tensor:
        """self.staged[first, :cols] (1-D), or with `stop` its rows first..stop-1 (2-D), kept per shape."""
        return self._staged_views.get((first, cols, stop), lambda: self.staged[first, :cols] if stop is None
                                      else self.staged[first:stop, :cols])

    def _padded_rows(self, num_tokens: int, query_lens: list[int]) -> int:
        """Rows to stage: a decode graph's batch size, a piecewise capture size, or the tokens."""
        if self.graphs is not None and all(n == 1 for n in query_lens):
            size = self.graphs.padded_size(num_tokens)
            if size is not None:
                return size
        if self.piecewise is not None:
            return self.piecewise.padded_size(num_tokens) or num_tokens
        return num_tokens

    def dummy_decode_batch(self, size: int) -> ForwardBatch:
        """A decode batch of `size` empty rows, for graph capture."""
        return self._stage([[0] * size], [[0] * size], [[-1] * size], [1] * size, [0] * size, [[]] * size, [])
