"""ModelRunner: owns the model, the KV-cache tensors, the attention backend and
the sampler, and runs one scheduled step: build the batch, plan attention, run
the model, compute the needed logits, sample."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lanner.config import EngineConfig
from lanner.engine.request import Logprob, Request
from lanner.engine.scheduler import SchedulerOutput
from lanner.executor.batch import ForwardBatch
from lanner.layers.attention import forward_context
from lanner.layers.attention.torch_backend import TorchAttentionBackend
from lanner.models.loader import LoadedModel
from lanner.sampling.sampler import Sampler, top_logprobs

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    # (request, sampled token, its logprobs or None) for requests that reached their last token
    sampled: list[tuple[Request, int, dict[int, Logprob] | None]] = field(default_factory=list)
    # request id -> logprobs of the prompt tokens this step's chunk predicted
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.model = loaded.model
        spec = self.model.spec
        self.block_size = config.cache.block_size
        self.num_blocks = self._num_kv_blocks(spec)
        shape = (self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(spec.num_layers)]
        self.backend = TorchAttentionBackend(self.kv_caches, self.block_size)
        self.sampler = Sampler()
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size)

    def _num_kv_blocks(self, spec) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        elem = torch.tensor([], dtype=self.dtype).element_size()
        block_bytes = 2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim * elem
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cache.gpu_memory_utilization - (1 << 30)  # headroom for activations
        else:
            budget = cache.kv_cache_memory_gib * (1 << 30)
        return max(int(budget // block_bytes), 1)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        batch, samplers, prompt_rows = self.prepare(sched)
        self.backend.plan(batch)
        with forward_context(self.backend):
            hidden = self.model(batch.input_ids, batch.positions)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        out = RunnerOutput()
        if samplers:
            rows = torch.tensor([row for _, row in samplers], device=logits.device)
            reqs = [req for req, _ in samplers]
            tokens, logprobs = self.sampler(logits[rows], reqs)
            out.sampled = list(zip(reqs, tokens, logprobs))
        for req, first_row, targets in prompt_rows:
            lp = torch.log_softmax(logits[first_row:first_row + len(targets)].float(), dim=-1)
            out.prompt_logprobs[req.request_id] = [
                top_logprobs(lp[j], t, req.params.prompt_logprobs) for j, t in enumerate(targets)]
        return out

    def prepare(self, sched: SchedulerOutput):
        """The ForwardBatch of a step, plus which logits rows each request reads:
        samplers: (request, row) for requests whose last token is computed now;
        prompt_rows: (request, first row, prompt tokens those rows predict)."""
        input_ids, positions, slots, logits_indices = [], [], [], []
        samplers, prompt_rows = [], []
        bs = self.block_size
        start = 0
        for req, n in sched.scheduled:
            begin = req.num_computed_tokens
            input_ids += req.all_token_ids[begin:begin + n]
            positions += range(begin, begin + n)
            slots += [req.block_ids[p // bs] * bs + p % bs for p in range(begin, begin + n)]
            if req.prompt_logprobs is not None:
                # positions whose logits predict prompt tokens not scored yet (a preempted
                # request recomputes its prompt but scores each token once)
                first = max(begin, len(req.prompt_logprobs) - 1)
                last = min(begin + n, req.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows.append((req, len(logits_indices), req.prompt_token_ids[first + 1:last + 1]))
                    logits_indices += range(start + first - begin, start + last - begin)
            if begin + n == req.num_tokens:
                samplers.append((req, len(logits_indices)))
                logits_indices.append(start + n - 1)
            start += n
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_lens=[n for _, n in sched.scheduled],
            seq_lens=[req.num_computed_tokens + n for req, n in sched.scheduled],
            block_tables=[req.block_ids for req, _ in sched.scheduled],
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
            num_real_tokens=start,
        )
        return batch, samplers, prompt_rows
