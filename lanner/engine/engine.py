"""LLMEngine: the step loop. One step reads top to bottom:

    schedule -> launch the model and sampling on the device -> read back the
    previous step's tokens -> append them, check stops, free finished
    requests -> return outputs

With overlap scheduling (the default) the host prepares and launches step N
while the device still runs step N-1, and handles N-1's tokens while the device
runs N: step N reads N-1's tokens on the device (as inputs, and in penalty
histories). The price is one step of lag: a request that stopped at N-1
computes one more token at N, which is dropped.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

import torch

from lanner.config import EngineConfig, SpeculativeConfig
from lanner.core.profiling import step_range
from lanner.core.request import (
    CompletionOutput,
    Request,
    RequestOutput,
    RequestOutputKind,
    RequestStatus,
    SamplingParams,
)
from lanner.core.schedule import SchedulerOutput
from lanner.engine.detokenizer import Detokenizer, TokenBytes, find_stop_string, stream_decoder, visible_length
from lanner.engine.grammar import Grammars, parse
from lanner.engine.kv_cache import KVCacheManager
from lanner.engine.prompts import Prompts
from lanner.engine.scheduler import Scheduler
from lanner.engine.speculation import Speculator
from lanner.errors import CapacityExceeded, ConfigError, EngineDead, InvalidRequest
from lanner.executor.model_runner import build_runner
from lanner.executor.step_handle import StepHandle, first_rows
from lanner.executor.worker import start_ranks
from lanner.models.loader import load_model

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's names


def resolve_dtype(name: str, device: torch.device, hf_config: Any) -> torch.dtype:
    if name != "auto":
        return getattr(torch, DTYPE_ALIASES.get(name, name))
    if device.type == "cpu":
        return torch.float32
    dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from lanner.default_model import default_model_path
        from lanner.models.hub import resolve_model_path
        from lanner.models.loader import load_hf_config

        self.config = config
        mc = config.model
        path = resolve_model_path(mc.model or default_model_path(), mc.revision, mc.download_dir)
        tokenizer_path = resolve_model_path(mc.tokenizer, mc.tokenizer_revision, mc.download_dir) \
            if mc.tokenizer else path
        self.device = resolve_device(config.device)
        hf_config = load_hf_config(path, mc.hf_overrides)
        self.dtype = resolve_dtype(config.dtype, self.device, hf_config)
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(mc.max_model_len or limit, limit)
        self.dead: str | None = None  # why the engine cannot run any more (a tensor-parallel rank failed)
        self.ranks = start_ranks(config, path, tokenizer_path, self.dtype, self.max_model_len, self.device.type)
        try:
            self._build(config, path, tokenizer_path)
        except BaseException:
            if self.ranks is not None:  # they wait for a plan that will never come
                self.ranks.kill()
            raise
        if self.ranks is not None:
            weakref.finalize(self, self.ranks.stop)

    def _build(self, config: EngineConfig, path: str, tokenizer_path: str) -> None:
        mc = config.model
        torch.manual_seed(config.seed)
        loaded = load_model(path, tokenizer_path, mc.load_format, self.dtype, self.device, config.seed,
                            mc.hf_overrides, mc.generation_config)
        self.hf_config = loaded.hf_config
        self.tokenizer = loaded.tokenizer
        self.tokenizer_path = tokenizer_path if self.tokenizer is not None else None
        self.stream_decoder = stream_decoder(self.tokenizer) if self.tokenizer is not None else None
        self.token_bytes = TokenBytes(self.tokenizer, self.stream_decoder) if self.tokenizer is not None else None
        self.prompts = Prompts(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token_ids = loaded.eos_token_ids
        self.sampling_defaults = loaded.sampling_defaults
        self.vocab_size = loaded.model.spec.vocab_size
        sc = config.scheduler
        if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens "
                              f"({sc.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})")
        self.max_logprobs = self.vocab_size if mc.max_logprobs == -1 else mc.max_logprobs
        speculative = SpeculativeConfig.of(config.speculative_config)
        self.speculator = Speculator(speculative) if speculative is not None else None
        proposer = self.speculator.proposer if self.speculator is not None else None
        self.runner = build_runner(config, loaded, path, self.device, self.dtype, self.max_model_len, proposer)
        draft = self.runner.drafter
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        if draft is not None:
            self.scheduler.lookahead = self.speculator.lookahead
            self.kv_cache.hit_blocks_recomputed = 1 if proposer.target_hidden else 0
        self.groups: dict[str, list[Request]] = {}  # request id -> its n samples
        self.grammars: Grammars | None = None  # built at the first structured-output request
        self.compiling: list[Request] = []  # constrained requests whose grammar is not compiled yet
        self.detokenizers: dict[Request, Detokenizer] = {}
        self._seeds = random.Random(config.seed)
        self.num_steps = 0
        self.num_tokens_computed = 0  # through the model, prompt and output (throughput logs)
        self.num_tokens_generated = 0
        self.num_overlapped_steps = 0  # launched before the previous step was read back
        self.num_overlapped_verify_steps = 0  # of them, steps that verified drafts
        # wall time inside step(), and between the end of one step and the start of the next while
        # requests were unfinished (the caller's loop: a server's commands and output dispatch)
        self.step_seconds = self.between_steps_seconds = 0.0
        self._last_step_end: float | None = None
        self.in_flight: tuple[SchedulerOutput, StepHandle] | None = None  # launched, not yet read back
        self._stepping: SchedulerOutput | None = None  # the step being launched
        self._reading: SchedulerOutput | None = None  # the step being read back

    # ---- requests in and out -------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Queue a request; raises InvalidRequest or CapacityExceeded without touching engine state."""
        params = params or SamplingParams()
        if self.dead is not None:
            raise EngineDead(self.dead)
        if request_id in self.groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        keep = params.truncate_prompt_tokens
        if keep is not None and len(token_ids) > (keep if keep > 0 else self.max_model_len - 1):
            text, token_ids = None, token_ids[-(keep if keep > 0 else self.max_model_len - 1):]
        self._validate(token_ids, params)
        bad_word_ids = self._bad_word_ids(params.bad_words) if params.bad_words else []
        spec = params.structured_outputs
        grammar = self._parse_grammar(spec) if spec is not None else None
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}-{i}"
            children.append(Request(child_id, text, token_ids, params, self.eos_token_ids,
                                    (seed + i * 0x9E3779B97F4A7C15) % (1 << 64), index=i, parent_id=request_id,
                                    max_num_tokens=self.max_model_len))
            children[-1].bad_word_ids = bad_word_ids
            children[-1].speculative = self.speculator is not None and children[-1].can_speculate
        self.groups[request_id] = children
        for req in children:
            if self.tokenizer is not None:
                self.detokenizers[req] = Detokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                     self.stream_decoder)
            if grammar is not None:
                self.grammars.start(req, spec, grammar)
                if not req.grammar.ready:
                    self.compiling.append(req)
                    continue
            self.scheduler.add(req)

    def _parse_grammar(self, spec):
        """The xgrammar Grammar of a request's structured outputs (refused here, before any state changes)."""
        if self.tokenizer is None:
            raise InvalidRequest("structured outputs need a tokenizer, and this model has none")
        if self.ranks is not None:
            raise InvalidRequest("structured outputs are not supported with tensor_parallel_size > 1 yet "
                                 "(every rank samples, and only rank 0 would hold the grammar)")
        grammar = parse(spec)
        if self.grammars is None:
            self.grammars = Grammars(self.config.structured, self.tokenizer, self.vocab_size)
        return grammar

    def _admit_compiled(self) -> list[RequestOutput]:
        """Constrained requests whose grammar is ready join the scheduler, in arrival order; with
        nothing else to run, wait a little for one rather than spin."""
        if not self.compiling:
            return []
        if not self.scheduler.has_unfinished() and self.in_flight is None:
            wait([r.grammar.compiled for r in self.compiling], timeout=0.01, return_when=FIRST_COMPLETED)
        ready = [r for r in self.compiling if r.grammar.ready]
        self.compiling = [r for r in self.compiling if not r.grammar.ready]
        failed = set()
        for req in ready:
            error = req.grammar.compiled.exception()
            if error is None:
                self.scheduler.add(req)
            else:
                logger.error("request %s: its grammar failed to compile: %s", req.parent_id, error)
                failed.add(req.parent_id)
        return [out for out in map(self.abort_request, sorted(failed)) if out is not None]

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the model's recommended settings (its generation_config.json),
        as used when a caller gives none; `overrides` win."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output, or None if unknown."""
        if request_id not in self.groups:
            return None
        for req in self.groups[request_id]:
            if req in self.compiling:
                self.compiling.remove(req)
            if not req.finished:
                req.finish("abort")
                self.scheduler.finish(req)
        if not self.has_unfinished_requests():  # idle from here: the time until the next step is not between steps
            self._last_step_end = None
        return self._finalize(request_id)

    def render_chat(self, conversation: list[dict], **options: Any) -> list[int]:
        """Token ids of a conversation ([{"role", "content"}, ...]) through the chat template;
        options: add_generation_prompt, continue_final_message, chat_template, tools,
        chat_template_kwargs (see Prompts.render_chat)."""
        if self.prompts is None:
            raise InvalidRequest("this model has no tokenizer, so it has no chat template")
        return self.prompts.chat_token_ids(conversation, **options)

    def fail_step(self) -> list[str]:
        """After an exception inside step(): abort the requests of the failed step (and of the
        step in flight, whose results are lost) and return their ids; the engine can go on."""
        affected = {req.parent_id for req, _ in self._stepping.scheduled} if self._stepping else None
        if self.in_flight is not None:
            affected = (affected or set()) | {req.parent_id for req, _ in self.in_flight[0].scheduled}
            self.in_flight = None
        if affected is None:  # it failed before scheduling anything: trust nobody that runs
            affected = {req.parent_id for req in self.scheduler.running}
        # and the step being read back (some of its requests may have finished in the failed pass,
        # unreported), and whoever still waits for a token that will never be read back
        if self._reading is not None:
            affected |= {req.parent_id for req, _ in self._reading.scheduled if req.parent_id in self.groups}
        affected |= {req.parent_id for req in (*self.scheduler.running, *self.scheduler.waiting) if req.num_pending}
        self._stepping = self._reading = None
        for request_id in affected:
            self.abort_request(request_id)
        return sorted(affected)

    def has_unfinished_requests(self) -> bool:
        # requests of an in-flight step stay in the scheduler until finished
        return self.scheduler.has_unfinished() or bool(self.compiling)

    # ---- the step ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        if self._last_step_end is not None:
            self.between_steps_seconds += start - self._last_step_end
        try:
            return self._step()
        finally:
            end = time.monotonic()
            self.step_seconds += end - start
            self._last_step_end = end if self.has_unfinished_requests() else None

    def _step(self) -> list[RequestOutput]:
        self._stepping = None
        outputs = self._admit_compiled()
        if self.in_flight is not None and self._must_read_back(self.in_flight[1]):
            outputs += self._read_back()  # the next step needs its tokens on the host: no overlap
        if self.speculator is not None:
            proposed = self.in_flight[1].proposed if self.in_flight is not None else None
            self.speculator.propose(self.scheduler.running, 0 if proposed is None else proposed.shape[1])
        with step_range("schedule"):
            sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs + self._read_back()
        self._stepping = sched  # what fail_step aborts if the launch raises
        # a step with structured outputs samples only after the step before is read back (below)
        constrained = any(req.grammar is not None for req, _ in sched.scheduled)
        handle = self.runner.launch(sched, sample=not constrained) if self.ranks is None \
            else self._launch_on_every_rank(sched)
        self.num_steps += 1
        self.num_tokens_computed += sched.num_tokens
        for req, num_new in sched.scheduled:
            req.num_computed_tokens += num_new
        if not constrained:
            self._count_pending(handle)
        previous, self.in_flight = self.in_flight, (sched, handle)
        if previous is not None:
            self.num_overlapped_steps += 1
            self.num_overlapped_verify_steps += bool(sched.drafts)
            outputs += self._postprocess(*previous)
        if constrained:  # the matchers have taken the tokens of the step before: mask, then sample
            rows = [(req, row, sched.drafts.get(req, [])) for req, row in first_rows(handle.samplers).items()
                    if req.grammar is not None]
            self.runner.sample(handle, self.grammars.bitmask(rows), late=True)
            self._count_pending(handle)
        if not self.config.scheduler.overlap_scheduling:
            outputs += self._read_back()
        return outputs

    @staticmethod
    def _count_pending(handle: StepHandle) -> None:
        """Its samples are on the device: 1 + its drafts per request, as if all were accepted (the
        read-back gives back the rejected ones). A late-sampled step counts them after the step
        before is read back, so its sampler sees every output index on the host."""
        for req in dict.fromkeys(handle.samplers):
            req.num_pending += 1 + len(req.draft_token_ids)

    def _launch_on_every_rank(self, sched: SchedulerOutput) -> StepHandle:
        """Send the plan to the other ranks, then run this rank's part. A failure here (a rank gone,
        a collective that timed out, an error on this rank) leaves the ranks out of step: the
        engine is dead, and the ranks are stopped so nothing waits on them."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        try:
            self.ranks.send(sched)
            return self.runner.launch(sched)
        except Exception as e:
            self.dead = f"a tensor-parallel step failed ({type(e).__name__}: {e}); the ranks are stopped"
            logger.error("%s", self.dead)
            self.ranks.kill()
            raise EngineDead(self.dead) from e

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one rank)."""
        if self.ranks is not None:
            self.ranks.stop()

    def _must_read_back(self, handle: StepHandle) -> bool:
        """Whether the step in flight must be read back before the next is planned: a request of it
        samples next from its tokens on the host (logits processors, bad words), drafts next on the
        host (n-gram), or has penalties or min_tokens to respect with drafts; or one of its requests
        verified drafts (the next step's positions move on the device by the rejected ones, which
        only decode steps support) and the next step may hold a prompt."""
        samplers = dict.fromkeys(handle.samplers)
        if any(r.reads_output_on_host for r in samplers):
            return True
        drafting = [r for r in samplers if r.num_verifying or r.may_draft_next]
        if not drafting:
            return False
        if handle.proposed is None:
            return True  # drafts come from the host (n-gram lookup over the tokens read back)
        if not all(r.next_step_on_device for r in drafting):
            return True
        return any(r.num_verifying for r in drafting) and not self.scheduler.decodes_only_next()

    def _read_back(self) -> list[RequestOutput]:
        if self.in_flight is None:
            return []
        previous, self.in_flight = self.in_flight, None
        return self._postprocess(*previous)

    def _postprocess(self, sched: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        self._reading = sched  # what fail_step aborts if this raises
        with step_range("read back"):
            result = handle.result()
        with step_range("postprocess"):
            touched: set[str] = set()
            for req, begin, rows in result.routed_experts:
                req.record_routing(begin, rows)
            for req, _ in sched.scheduled:
                if req.request_id in result.prompt_logprobs and not req.finished:
                    req.prompt_logprobs.extend(self._decode_logprobs(result.prompt_logprobs[req.request_id]))
                    touched.add(req.parent_id)
            for req, rows in itertools.groupby(result.sampled, key=lambda row: row[0]):
                if req.finished:  # stopped (or aborted) after this step was launched: drop its extra token
                    continue
                self._append_sampled(req, [(token, logprobs) for _, token, logprobs in rows], sched.drafts.get(req, []))
                req.proposed_token_ids = result.proposed.get(req, [])
                self._fill_unread_drafts(req)
                touched.add(req.parent_id)
                if req.finished:
                    self.scheduler.finish(req)
            outputs = [self._finalize(pid) if all(r.finished for r in self.groups[pid]) else self._output(pid)
                       for pid in touched]
            outputs = [out for out in outputs if out is not None]
        self._reading = None
        return outputs

    def _append_sampled(self, req: Request, rows: list[tuple[int, dict | None]], drafts: list[int]) -> None:
        """A request's sampled rows: one token, or with drafts the target's sample after each
        draft (emitted up to the first that differs from its draft; see engine/speculation.py)."""
        accepted = self.speculator.record(req, drafts, [token for token, _ in rows]) if drafts else 0
        appended = 0
        for token, logprobs in rows[:accepted + 1]:
            self._append(req, token, logprobs)
            appended += 1
            if req.finished:
                break
        req.num_pending = max(req.num_pending - (len(rows) - appended), 0)  # it counted every row
        if req.status is RequestStatus.RUNNING:  # (a preempted request recomputes from scratch)
            req.num_computed_tokens -= len(drafts) - accepted  # the rejected drafts' KV is rewritten next

    def _fill_unread_drafts(self, req: Request) -> None:
        """The step in flight took this request's drafts from the proposals just read back."""
        step = self.in_flight[0] if self.in_flight is not None else None
        if step is not None and req in step.unread_drafts:
            step.drafts[req] = req.proposed_token_ids[:len(step.drafts[req])]
            step.unread_drafts.discard(req)

    def _append(self, req: Request, token: int, logprobs: dict | None) -> None:
        now = time.monotonic()
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.append_token(token)
        self.num_tokens_generated += 1
        if logprobs is not None:
            req.logprobs.extend(self._decode_logprobs([logprobs]))
            req.cumulative_logprob += logprobs[token].logprob
        if req.grammar is not None and not req.grammar.accept(token):  # masked out: a bug, not the model
            logger.error("request %s: token %d breaks its structured-output grammar; stopped", req.parent_id, token)
            req.finish("abort")
            return
        if token in req.stop_token_ids:
            req.finish("stop", None if token in self.eos_token_ids else token)
            return
        detok = self.detokenizers.get(req)
        if detok is not None:
            new_text = detok.push(token)
            req.output_text += new_text
            if req.params.stop and new_text:
                stop = find_stop_string(req, len(new_text))
                if stop is not None:
                    req.finish("stop", stop)
                    return
        if req.grammar is not None and req.grammar.terminated:  # complete, with no stop token to end it (ignore_eos)
            req.finish("stop")
            return
        max_tokens = req.params.max_tokens
        # known tokens only: with overlap scheduling, num_tokens also counts the next pending one
        if (max_tokens is not None and len(req.output_token_ids) >= max_tokens) or \
                len(req.all_token_ids) >= self.max_model_len:
            req.finish("length")

    # ---- helpers -------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt: a string, token ids, or a dict with "prompt_token_ids"
        (and optionally its "prompt" text, kept for the output) or "prompt"."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, prompt = prompt.get("prompt"), prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequest("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.prompts is None:
                raise InvalidRequest("this model has no tokenizer: pass prompts as token ids")
            return prompt, self.prompts.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return (text if isinstance(text, str) else None), list(prompt)
        raise InvalidRequest(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequest("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"unknown token ids {bad[:5]} (vocabulary size {self.vocab_size})")
        if params.logits_processors and self.ranks is not None:
            raise InvalidRequest("logits_processors run on one process; with tensor_parallel_size > 1 every rank "
                                 "samples, so they are not supported there")
        if (params.return_routed_experts or params.return_prompt_routed_experts) and self.runner.routing is None:
            raise InvalidRequest("routed experts are recorded only by an engine started with "
                                 "enable_return_routed_experts (--enable-return-routed-experts) on a MoE model")
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > self.max_logprobs:
                raise InvalidRequest(f"{name}: {asked} requested, but this engine returns at most {self.max_logprobs} "
                                     "(max_logprobs)")
        for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise InvalidRequest(f"{name}: unknown token ids {bad[:5]} (vocabulary size {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {len(token_ids)} tokens; the model's context is "
                                 f"{self.max_model_len} tokens, including at least one output token")
        longest = min(len(token_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.kv_cache.blocks_needed(longest) > self.kv_cache.num_blocks:
            raise CapacityExceeded(f"a request of up to {longest} tokens needs "
                                   f"{self.kv_cache.blocks_needed(longest)} KV blocks; the cache has "
                                   f"{self.kv_cache.num_blocks}")

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's tokens, alone and after a space (a word inside text is usually spelled
        with its leading space), as vLLM tokenizes bad words."""
        if self.prompts is None:
            raise InvalidRequest("bad_words needs a tokenizer, and this model has none")
        out: list[list[int]] = []
        for word in words:
            for spelling in (word.lstrip(), " " + word.lstrip()):
                ids = self.prompts.encode(spelling, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def _decode_logprobs(self, entries: list[dict]) -> list[dict]:
        if self.tokenizer is not None:
            for entry in entries:
                for tid, lp in entry.items():
                    lp.decoded_token, lp.token_bytes = self.token_bytes.text(tid)
        return entries

    def _output(self, parent_id: str) -> RequestOutput | None:
        """The request's output of its params' output_kind (None: FINAL_ONLY, not finished)."""
        reqs = self.groups[parent_id]
        first = reqs[0]
        finished = all(r.finished for r in reqs)
        kind = first.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        prompt, prompt_ids, prompt_logprobs = first.prompt, first.prompt_token_ids, first.prompt_logprobs
        if delta:
            sent = first.sent
            if sent.outputs:
                prompt, prompt_ids = None, []
            if prompt_logprobs is not None:
                prompt_logprobs, sent.prompt_logprobs = prompt_logprobs[sent.prompt_logprobs:], len(prompt_logprobs)
            sent.outputs += 1
        elif prompt_logprobs is not None:
            prompt_logprobs = list(prompt_logprobs)
        prompt_routing = None
        if first.params.return_prompt_routed_experts:  # recorded so far (a chunked prompt grows over steps)
            prompt_routing = first.routed_experts[:first.num_prompt_tokens - 1]
            if delta:
                prompt_routing, first.sent.prompt_routing = (prompt_routing[first.sent.prompt_routing:],
                                                             len(prompt_routing))
        return RequestOutput(request_id=parent_id, prompt=prompt, prompt_token_ids=prompt_ids,
                             outputs=[self._completion(r, delta) for r in reqs], finished=finished,
                             prompt_logprobs=prompt_logprobs, num_cached_tokens=first.num_cached_tokens,
                             metrics=first.metrics, prompt_routed_experts=prompt_routing)

    @staticmethod
    def _completion(r: Request, delta: bool) -> CompletionOutput:
        """A sample's visible state: all of it, or (delta) what earlier outputs did not carry."""
        end, sent = visible_length(r), r.sent
        start = (sent.text, sent.tokens, sent.logprobs) if delta else (0, 0, 0)
        text, tokens = r.output_text[start[0]:end], r.output_token_ids[start[1]:]
        logprobs = None if r.logprobs is None else r.logprobs[start[2]:]
        routing = r.output_routing(start[1], len(r.output_token_ids)) if r.params.return_routed_experts else None
        if delta:
            sent.text, sent.tokens, sent.logprobs = end, len(r.output_token_ids), len(r.logprobs or ())
        return CompletionOutput(index=r.index, text=text, token_ids=tokens,
                                cumulative_logprob=r.cumulative_logprob if r.logprobs is not None else None,
                                logprobs=logprobs, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                                routed_experts=routing)

    def _finalize(self, parent_id: str) -> RequestOutput:
        reqs = self.groups[parent_id]
        reqs[0].metrics.output_lengths = [len(r.output_token_ids) for r in reqs]
        output = self._output(parent_id)
        for req in self.groups.pop(parent_id):
            self.detokenizers.pop(req, None)
        return output
