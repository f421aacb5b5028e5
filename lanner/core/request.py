"""Requests, their sampling parameters and the outputs the engine returns.

Names follow vLLM (`SamplingParams`, `RequestOutput`, `CompletionOutput`) so
code written for it reads the same here.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import operator
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lanner.core.structured import StructuredOutputsParams
from lanner.errors import InvalidRequest


class RequestOutputKind(enum.Enum):
    """What each output of a request carries (vLLM's names)."""
    CUMULATIVE = 0  # everything so far: simple, but each output costs as much as the whole
    DELTA = 1  # what is new since the previous output (streams: linear in the output's length)
    FINAL_ONLY = 2  # one output, the whole, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-n logprobs per output token (the sampled one is always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    # fn(output_token_ids, logits_row) or fn(prompt_token_ids, output_token_ids, logits_row) -> logits_row
    logits_processors: list[Callable] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    return_routed_experts: bool = False
    return_prompt_routed_experts: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # or a dict of its fields

    HELP: typing.ClassVar[dict[str, str]] = {
        "n": "samples per prompt",
        "temperature": "0 is greedy",
        "top_p": "keep the most likely tokens up to this probability mass",
        "top_k": "keep this many most likely tokens (0: all)",
        "min_p": "drop tokens less likely than min_p times the most likely one",
        "presence_penalty": "subtracted from the logits of tokens already generated",
        "frequency_penalty": "subtracted once per earlier occurrence in the output",
        "repetition_penalty": "divides positive (multiplies negative) logits of tokens seen so far",
        "seed": "per-request sampling seed",
        "stop": "stop strings (not included in the output)",
        "stop_token_ids": "token ids that end generation",
        "include_stop_str_in_output": "keep the stop string in the text",
        "ignore_eos": "keep generating past end-of-sequence tokens",
        "max_tokens": "most tokens to generate",
        "min_tokens": "fewest tokens to generate before a stop token may end it",
        "logprobs": "top logprobs to return per output token",
        "prompt_logprobs": "top logprobs to return per prompt token",
        "skip_special_tokens": "leave special tokens out of the text",
        "logit_bias": "token id -> value added to its logit before sampling",
        "allowed_token_ids": "sample only among these token ids",
        "bad_words": "words that must not be generated",
        "truncate_prompt_tokens": "keep only the last k prompt tokens (-1: as many as the context allows)",
        "logits_processors": "callables applied to each output position's logits (offline API only)",
        "output_kind": "what each output carries: CUMULATIVE, DELTA or FINAL_ONLY (LLM.generate: FINAL_ONLY)",
        "return_routed_experts": "per output token, the experts each MoE layer chose for the forward pass that "
                                 "produced it (engine option enable_return_routed_experts)",
        "return_prompt_routed_experts": "also per prompt token but the last, the experts chosen where it was the "
                                        "input (skips prefix-cache reads, as prompt_logprobs does)",
        "structured_outputs": "constrain the output, as JSON: {\"json\": SCHEMA}, {\"regex\": ...}, "
                              "{\"choice\": [...]}, {\"grammar\": EBNF} or {\"json_object\": true}",
    }

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        self._validate()

    def _check_types(self) -> None:
        """Wrong types are InvalidRequest naming the field, not a TypeError from deep inside
        (True is not a number here, "0.5" is not a float)."""
        def number(v, whole: bool) -> bool:
            return not isinstance(v, bool) and isinstance(v, int if whole else (int, float))

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not number(getattr(self, name), whole=False):
                raise InvalidRequest(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("n", "top_k", "min_tokens", "seed", "max_tokens", "logprobs", "prompt_logprobs",
                     "truncate_prompt_tokens"):
            value = getattr(self, name)
            if not (number(value, whole=True) or (value is None and name not in ("n", "top_k", "min_tokens"))):
                raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "return_routed_experts",
                     "return_prompt_routed_experts"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.stop is None or isinstance(self.stop, str) or isinstance(self.stop, (list, tuple))):
            raise InvalidRequest(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not (self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple))):
            raise InvalidRequest(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise InvalidRequest(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InvalidRequest(msg)

        need(isinstance(self.n, int) and 1 <= self.n <= 128, f"n must be in [1, 128], got {self.n}")
        need(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k}")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        need(self.seed is None or isinstance(self.seed, int), "seed must be an integer")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be >= 1, got {self.max_tokens}")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens must be >= 0")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens")
        need(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
            and not isinstance(b, bool) and -100 <= b <= 100 for t, b in self.logit_bias.items())),
            "logit_bias must map token ids to values in [-100, 100]")
        need(self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                                                and all(_is_token_id(t) for t in self.allowed_token_ids)),
             "allowed_token_ids must be a non-empty list of token ids")
        need(self.bad_words is None or (isinstance(self.bad_words, list)
                                        and all(isinstance(w, str) and w.strip() for w in self.bad_words)),
             "bad_words must be a list of non-empty strings")
        need(self.truncate_prompt_tokens is None or (isinstance(self.truncate_prompt_tokens, int) and (
            self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)),
            "truncate_prompt_tokens must be >= 1 or -1")
        need(self.logits_processors is None or (isinstance(self.logits_processors, list)
                                                and all(callable(f) for f in self.logits_processors)),
             "logits_processors must be a list of callables")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0),
                 f"{name} must be a count >= 0 (at most the engine's max_logprobs)")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # smaller temperatures overflow the logits / temperature division

    def clone(self) -> SamplingParams:
        """A deep copy that shares the logits processors (they may hold models or state), as vLLM's."""
        shared = {id(f): f for f in self.logits_processors or []}
        return copy.deepcopy(self, memo=shared)


def _is_token_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def pickled_by_fields(cls: type) -> type:
    """Pickle a dataclass's instances as (class, their fields in order), so loading one is a
    constructor call: pickle's default (state as a dict per object) took twice as long to load, and
    a served step's outputs cross the engine process's pipe, hundreds per step."""
    names = [f.name for f in dataclasses.fields(cls)]
    # the constructor must take every field, positionally, and nothing else may live on an instance
    assert len(names) > 1 and all(f.init and not f.kw_only for f in dataclasses.fields(cls)) \
        and not hasattr(cls, "__post_init__"), f"{cls.__name__} does not rebuild from its fields in order"
    fields = operator.attrgetter(*names)
    cls.__reduce__ = lambda self: (type(self), fields(self))
    return cls


@pickled_by_fields
@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None
    token_bytes: bytes | None = None  # raw bytes (a piece of a multi-byte character decodes to U+FFFD)


@pickled_by_fields
@dataclass
class RequestMetrics:
    arrival_time: float
    num_prompt_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    output_lengths: list[int] | None = None  # tokens generated by each sample, once all finished


@dataclass
class DeltaSent:
    """How much of a request its DELTA outputs have carried so far."""
    outputs: int = 0
    text: int = 0
    tokens: int = 0
    logprobs: int = 0
    prompt_logprobs: int = 0
    prompt_routing: int = 0


class Request:
    """One sequence being generated. `num_computed_tokens` is the scheduler's
    invariant: tokens before it have KV in the cache, the rest still need a
    forward pass (prompt chunks, or the last sampled token)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, eos_token_ids: set[int], seed: int = 0,
                 index: int = 0, parent_id: str | None = None, max_num_tokens: int | None = None):
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index  # position among the parent's n samples
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        self.seed = seed  # with the output index, keys the sampler's random numbers
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)  # known on the host
        # the prompt again, for staging long prompt chunks: a slice of it copies into the step's
        # inputs at memory speed, where a list converts element by element (8k tokens: ~130 us);
        # int32 (ids are below the vocabulary size) halves what it adds to a request
        self.prompt_array = np.asarray(prompt_token_ids, dtype=np.int32)
        # Sampled on the device, not yet read back (overlap scheduling): they count in num_tokens, and
        # the next step reads the newest one from the device. A step that verifies m drafts adds
        # 1 + m (as if it accepted all; the read-back gives back what it rejected).
        self.num_pending = 0
        # in the last step it sampled in: its first sampler row, its index among that step's sampling
        # requests (the drafter's accepted counts and proposals), and the drafts that step verified
        self.sample_row = 0
        self.sample_index = 0
        self.num_verifying = 0
        limit = len(prompt_token_ids) + params.max_tokens if params.max_tokens is not None else None
        self.max_num_tokens = min(x for x in (limit, max_num_tokens, 1 << 62) if x is not None)
        self.has_penalties = (params.repetition_penalty != 1.0 or bool(params.presence_penalty)
                              or bool(params.frequency_penalty))
        self.bad_word_ids: list[list[int]] = []  # token sequences of params.bad_words (set by the engine)
        self.grammar = None  # structured outputs: its engine/grammar.py RequestGrammar (set by the engine)
        self.num_computed_tokens = 0
        self.speculative = False  # the engine proposes drafts for it (when it decodes)
        self.draft_token_ids: list[int] = []  # this step's drafts, computed after its last token
        self.drafts_on_device = False  # this step's drafts are the last step's proposals, not read back yet
        self.proposed_token_ids: list[int] = []  # a model proposer's drafts, read back with the last token
        self.spec_misses = 0  # verifications in a row that accepted no draft (with the adaptive policy)
        self.spec_pause = 0  # steps left to decode without drafts (engine/speculation.py's policy)
        # it drafts one token at a time until one is accepted (engine/speculation.py); None until
        # its first drafting step decides
        self.spec_probing: bool | None = None
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache on first admission
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # content hash of each full block, a chain
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.output_text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        # per position computed so far (None where the prefix cache served it): the experts each MoE
        # layer chose for that input token, [layers][top_k]; the first computation is kept
        self.routed_experts: list[list[list[int]] | None] | None = (
            [] if params.return_routed_experts or params.return_prompt_routed_experts else None)
        self.metrics = RequestMetrics(arrival_time=time.monotonic(), num_prompt_tokens=len(prompt_token_ids))
        self.sent = DeltaSent()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    @property
    def awaiting_last_token(self) -> bool:
        """Its final token is sampled but not read back yet: nothing more to compute."""
        return self.num_pending > 0 and self.num_tokens >= self.max_num_tokens

    @property
    def reads_output_on_host(self) -> bool:
        """Its sampling reads its output tokens on the host (logits processors, multi-token bad
        words), so none of them may still be pending on the device when it samples."""
        return bool(self.params.logits_processors) or any(len(ids) > 1 for ids in self.bad_word_ids)

    @property
    def may_draft_next(self) -> bool:
        """It speculates and is not paused (engine/speculation.py), so it may draft next step."""
        return self.speculative and not self.spec_pause

    def max_drafts(self, k: int) -> int:
        """The most drafts it may take next step: none while paused, one while it probes, else k
        (engine/speculation.py)."""
        return 0 if not self.may_draft_next else 1 if self.spec_probing else k

    @property
    def next_step_on_device(self) -> bool:
        """Its next step can be planned before this one is read back with what only the device
        knows (the drafts this step accepts, the drafts it proposes): no penalties (their history
        would hold the accepted drafts) and past min_tokens (masking depends on the output index)."""
        return not self.has_penalties and len(self.output_token_ids) >= self.params.min_tokens

    @property
    def can_speculate(self) -> bool:
        """Verification samples k+1 positions at once; penalties count the drafts before each
        position, but bad words and logits processors read the output on the host, so those
        requests are decoded without drafts instead."""
        return not (self.bad_word_ids or self.params.logits_processors)

    @property
    def has_logit_constraints(self) -> bool:
        p = self.params
        return bool(p.logit_bias or p.allowed_token_ids or self.bad_word_ids or p.logits_processors)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """A sampled token read back to the host (it was pending, if num_pending > 0)."""
        self.num_pending = max(self.num_pending - 1, 0)
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def record_routing(self, begin: int, rows: list[list[list[int]]]) -> None:
        """The routing of positions begin.. (one row each); positions already recorded keep theirs
        (a preempted request recomputes them, and its tokens came from the first computation)."""
        record = self.routed_experts
        record += [None] * (begin - len(record))
        record += rows[len(record) - begin:]

    def output_routing(self, start: int, end: int) -> list:
        """Routing of output tokens start..end-1: token j came from the pass over position P - 1 + j."""
        first = self.num_prompt_tokens - 1
        return self.routed_experts[first + start:first + end]

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = time.monotonic()


@pickled_by_fields
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # per token of token_ids, per MoE layer, the top_k experts chosen (SamplingParams.return_routed_experts)
    routed_experts: list[list[list[int]]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@pickled_by_fields
@dataclass
class RequestOutput:
    """One request's state, of its params' output_kind. DELTA outputs carry the prompt (text, ids)
    in the first output only: a long prompt is not sent again with every step."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)
    # per prompt token but the last (return_prompt_routed_experts); DELTA outputs carry what is new
    prompt_routed_experts: list[list[list[int]] | None] | None = None


def merge_completions(parts: list[CompletionOutput]) -> CompletionOutput:
    """One DELTA completion carrying what `parts` (consecutive deltas of one sample) did."""
    last = parts[-1]
    logprobs = None if last.logprobs is None else [entry for c in parts for entry in c.logprobs or ()]
    routing = None if last.routed_experts is None else [row for c in parts for row in c.routed_experts or ()]
    return CompletionOutput(last.index, "".join(c.text for c in parts), [t for c in parts for t in c.token_ids],
                            last.cumulative_logprob, logprobs, last.finish_reason, last.stop_reason, routing)


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """One DELTA output carrying what consecutive DELTA outputs of a request did (for a reader
    that fell behind: it gets everything it missed in one piece, in time linear in its size)."""
    if len(outputs) == 1:
        return outputs[0]
    first, last = outputs[0], outputs[-1]
    samples: dict[int, list[CompletionOutput]] = {}
    for out in outputs:
        for c in out.outputs:
            samples.setdefault(c.index, []).append(c)
    prompt_logprobs = None
    if any(o.prompt_logprobs is not None for o in outputs):
        prompt_logprobs = [entry for o in outputs for entry in o.prompt_logprobs or ()]
    prompt_routing = None
    if any(o.prompt_routed_experts is not None for o in outputs):
        prompt_routing = [row for o in outputs for row in o.prompt_routed_experts or ()]
    return RequestOutput(last.request_id, first.prompt, first.prompt_token_ids,
                         [merge_completions(parts) for _, parts in sorted(samples.items())], last.finished,
                         prompt_logprobs, last.num_cached_tokens, last.metrics, last.extra, prompt_routing)
