"""EngineConfig: the one definition of every engine option.

Each leaf field is at once a keyword of `LLM(...)` and a CLI flag
(`--max-num-seqs`); `add_cli_args` and `EngineConfig.from_kwargs` derive both
from the dataclasses below, so an option is declared exactly once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lanner.errors import ConfigError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    model: str | None = _opt(None, "a Hugging Face repo id (Qwen/Qwen3-0.6B: the local cache first, then a "
                                   "download unless HF_HUB_OFFLINE=1), a model folder, or a config.json; default: "
                                   "the embedded model")
    tokenizer: str | None = _opt(None, "tokenizer repo id or folder (default: the model's)")
    revision: str | None = _opt(None, "branch, tag or commit of a Hub model")
    tokenizer_revision: str | None = _opt(None, "branch, tag or commit of a Hub tokenizer")
    download_dir: str | None = _opt(None, "Hugging Face cache folder to look in and download to "
                                          "(default: the hub's own, HF_HUB_CACHE)")
    load_format: Literal["auto", "safetensors", "dummy"] = _opt(
        "auto", "'dummy' builds random weights of the right shapes without reading weight files; 'auto' and "
                "'safetensors' read safetensors")
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's limit)")
    trust_remote_code: bool = _opt(False, "accepted for compatibility: lanner implements each architecture "
                                          "itself and never runs code from a model repo")
    tokenizer_mode: Literal["auto", "hf", "slow", "mistral", "custom"] = _opt(
        "auto", "'auto' and 'hf': the Hugging Face (fast) tokenizer; the others are refused")
    generation_config: str = _opt("auto", "sampling defaults: 'auto' from the model's generation_config.json, "
                                          "'vllm' none (SamplingParams' own), or a folder to read it from")
    hf_overrides: dict | None = _opt(None, "fields merged into the model's config.json before the model is built "
                                           "(JSON on the command line)")
    max_logprobs: int = _opt(20, "most logprobs or prompt_logprobs a request may ask for (-1: the vocabulary)")
    quantization: str | None = _opt(None, "weight quantization; none is supported yet")

    def __post_init__(self) -> None:
        _check(self.max_model_len is None or self.max_model_len > 1, "max_model_len must be > 1")
        _check(self.tokenizer_mode in ("auto", "hf"),
               f"tokenizer_mode {self.tokenizer_mode!r} is not supported: lanner uses the Hugging Face tokenizer "
               "(transformers 5 has no slow tokenizers); use 'auto'")
        _check(self.quantization in (None, "none"),
               f"quantization {self.quantization!r} is not supported yet: lanner runs the checkpoint's "
               "bf16/fp16/fp32 weights")
        _check(self.max_logprobs >= -1, "max_logprobs must be >= 0, or -1 for the whole vocabulary")
        _check(self.hf_overrides is None or isinstance(self.hf_overrides, dict), "hf_overrides must be a dict")


@dataclass
class CacheConfig:
    block_size: int = _opt(16, "tokens per KV-cache block")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of identical prompt prefixes")
    num_kv_blocks: int | None = _opt(None, "fix the number of KV blocks instead of sizing from memory")
    kv_cache_memory_gib: float = _opt(1.0, "KV cache size on the CPU, in GiB")
    gpu_memory_utilization: float = _opt(0.9, "fraction of GPU memory lanner may use")
    swap_space: float = _opt(0, "GiB of CPU swap for preempted requests: lanner preempts by recompute and never "
                                "swaps, so only 0 is accepted")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = _opt(
        "auto", "KV cache element type: 'auto' (the model's dtype), or 'fp8' (= 'fp8_e4m3': half the bytes of "
                "bf16, so twice the cached tokens and half the KV reads of decode attention; the draft model's "
                "cache stays in the model's dtype)")

    def __post_init__(self) -> None:
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two, got {self.block_size}")
        _check(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks must be positive")
        _check(self.kv_cache_memory_gib > 0, "kv_cache_memory_gib must be positive")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]")
        _check(self.swap_space == 0, f"swap_space {self.swap_space} is not supported: lanner preempts by recompute "
                                     "and never swaps KV blocks to the CPU; leave swap_space out (or 0)")
        _check(self.kv_cache_dtype != "fp8_e5m2", "kv_cache_dtype 'fp8_e5m2' is not supported: lanner's fp8 KV "
                                                  "cache is e4m3 ('fp8' or 'fp8_e4m3')")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _opt(256, "most requests in one step")
    max_num_batched_tokens: int = _opt(8192, "token budget of one step; longer prompts are prefilled in chunks")
    overlap_scheduling: bool = _opt(True, "prepare and launch the next step while the device runs this one "
                                          "(results arrive one step later)")
    enable_chunked_prefill: bool = _opt(True, "prefill prompts longer than the step's token budget in chunks; "
                                              "off: each prompt in one step (needs max_num_batched_tokens >= "
                                              "max_model_len)")

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs must be positive")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = _opt(1, "ranks (GPUs, or CPU processes over gloo) to shard the model over; "
                                        "lanner starts them on this machine (see --nnodes for several)",
                                     aliases=("-tp",))
    nnodes: int = _opt(1, "machines the ranks are spread over (each runs `lanner ...` with its --node-rank); "
                          "not needed under torchrun, whose environment says it")
    node_rank: int = _opt(0, "this machine's index among --nnodes (0 runs the engine and the server)")
    master_addr: str = _opt("127.0.0.1", "address of node 0, where the ranks meet")
    master_port: int | None = _opt(None, "port on node 0 where the ranks meet (default: a free one; required "
                                         "with --nnodes > 1)")
    enable_expert_parallel: bool = _opt(False, "MoE layers: each rank holds whole experts (a contiguous block of "
                                                "them) instead of a slice of every expert's features")
    distributed_timeout_s: float = _opt(120.0, "a collective that waits longer than this fails (a rank that "
                                               "stopped answering), and the engine with it")

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1")
        _check(self.nnodes >= 1 and 0 <= self.node_rank < self.nnodes, "node_rank must be in [0, nnodes)")
        _check(self.tensor_parallel_size % self.nnodes == 0,
               f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of nnodes ({self.nnodes})")
        _check(self.nnodes == 1 or self.master_port is not None, "--nnodes > 1 needs --master-port")
        _check(self.distributed_timeout_s > 0, "distributed_timeout_s must be > 0")
        _check(not self.enable_expert_parallel or self.tensor_parallel_size > 1,
               "enable_expert_parallel spreads experts over the tensor-parallel ranks: it needs "
               "tensor_parallel_size > 1")


WHOLE_FORWARD_MAX_TOKENS = 2048  # prefill_graph_max_tokens's default with the Triton attention backend


@dataclass
class GraphConfig:
    enforce_eager: bool = _opt(False, "never use CUDA graphs")
    cuda_graph_sizes: list[int] | None = _opt(
        None, "decode batch sizes to capture (default: 1, 2, 4, 8, then every 8 up to 64 and every 16 up to "
              "max_num_seqs); with speculation each size B also gets a graph of B x (k+1) rows for verify steps")
    attention_backend: Literal["auto", "torch", "triton"] = _opt(
        "auto", "'triton' on CUDA, 'torch' (the reference) on the CPU")
    gemv_kernels: Literal["auto", "triton", "cublas"] = _opt(
        "auto", "weight matmuls of 1-8 rows (decode): 'auto' runs lanner's Triton GEMV for the shapes where a "
                "measurement on this GPU at startup (kept in ~/.cache/lanner, or $LANNER_CACHE_DIR) finds it "
                "faster than cuBLAS; 'triton' for every shape; 'cublas' never")
    dependent_launch: bool | None = _opt(
        None, "programmatic dependent launch between lanner's Triton kernels: each is scheduled while the one "
              "before it finishes, and waits inside for its results (default: on with a Hopper or newer GPU; "
              "needs one)")
    piecewise_graphs: bool | None = _opt(
        None, "piecewise CUDA graphs for prefill and mixed steps (default: on with CUDA unless --enforce-eager; "
              "on the CPU, turning it on runs the split, padded forward eagerly)")
    piecewise_max_tokens: int = _opt(8192, "largest piecewise capture size, in tokens (also capped by "
                                           "max_num_batched_tokens); larger steps run the pieces eagerly")
    piecewise_sizes: list[int] | None = _opt(
        None, "token counts to capture (default: every 16 to 256, then steps of 1/8 of the size)")
    prefill_graph_max_tokens: int | None = _opt(
        None, "prefill and mixed steps of up to this many tokens replay one CUDA graph of the whole forward, "
              "attention included, captured at each piecewise size up to it (default: "
              f"{WHOLE_FORWARD_MAX_TOKENS} with the Triton attention backend; 0: none); larger steps, and "
              "decode-only ones, replay the piecewise graphs")

    def __post_init__(self) -> None:
        _check(not self.cuda_graph_sizes or min(self.cuda_graph_sizes) > 0, "cuda_graph_sizes must be positive")
        _check(not self.piecewise_sizes or min(self.piecewise_sizes) > 0, "piecewise_sizes must be positive")
        _check(self.piecewise_max_tokens > 0, "piecewise_max_tokens must be positive")
        _check(self.prefill_graph_max_tokens is None or self.prefill_graph_max_tokens >= 0,
               "prefill_graph_max_tokens must be >= 0")


@dataclass
class MoEConfig:
    moe_backend: Literal["auto", "masked", "contiguous", "reference"] = _opt(
        "auto", "how a mixture-of-experts layer runs its experts: 'auto' picks per step by token count (the "
                "masked Triton executor up to --moe-masked-max-tokens, the contiguous one above; the torch "
                "reference where a probe refuses them), or force one")
    moe_masked_max_tokens: int = _opt(256, "largest step, in tokens, that the masked MoE executor runs under "
                                          "--moe-backend auto (measured crossover: docs/moe.md)")
    enable_return_routed_experts: bool = _opt(
        False, "record the experts each MoE layer chooses, so requests may ask for them "
               "(SamplingParams.return_routed_experts); costs a small copy per MoE layer and step")

    def __post_init__(self) -> None:
        _check(self.moe_masked_max_tokens >= 0, "moe_masked_max_tokens must be >= 0")


@dataclass
class StructuredOutputsConfig:
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = _opt(
        None, "the model thinks inside <think>...</think> first: the server returns that part as "
              "reasoning_content, and structured-output constraints apply only after it ends")
    max_grammar_compile_threads: int = _opt(2, "threads that compile structured-output grammars (off the step loop)")
    grammar_cache_size: int = _opt(256, "compiled structured-output grammars kept for reuse (by schema)")

    def __post_init__(self) -> None:
        _check(self.max_grammar_compile_threads >= 1, "max_grammar_compile_threads must be >= 1")
        _check(self.grammar_cache_size >= 1, "grammar_cache_size must be >= 1")


@dataclass
class SpeculativeConfig:
    """vLLM's `speculative_config`: which proposer drafts tokens and how many per step."""
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: the shortest and longest text ending looked up
    prompt_lookup_max: int = 5
    model: str | None = None  # draft_model, eagle3, mtp: the draft's folder or repo id (or a config.json)
    # lanner's own: a request whose drafts keep being rejected decodes without them for a while
    # (engine/speculation.py); off measures raw acceptance
    adaptive: bool = True

    METHODS: typing.ClassVar[tuple[str, ...]] = ("ngram", "draft_model", "eagle3", "mtp")

    def __post_init__(self) -> None:
        _check(self.method in self.METHODS, f"speculative method {self.method!r}: one of {', '.join(self.METHODS)}")
        k = self.num_speculative_tokens
        _check(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 16,
               f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        _check(isinstance(self.adaptive, bool), f"speculative_config adaptive must be true or false, got "
                                                 f"{self.adaptive!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        _check(all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) and 1 <= lo <= hi,
               f"need integers 1 <= prompt_lookup_min ({lo!r}) <= prompt_lookup_max ({hi!r})")

    @classmethod
    def of(cls, value: dict | None) -> SpeculativeConfig | None:
        """From the JSON object of `--speculative-config` (None: no speculation)."""
        if value is None:
            return None
        _check(isinstance(value, dict), "speculative_config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        _check(not unknown, f"speculative_config: unknown keys {unknown}; known: {', '.join(sorted(known))}")
        missing = [name for name in ("method", "num_speculative_tokens") if name not in value]
        _check(not missing, f"speculative_config needs {' and '.join(missing)}")
        return cls(**value)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    graphs: GraphConfig = field(default_factory=GraphConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    device: str = _opt("auto", "'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available)")
    dtype: Literal["auto", "float32", "float", "float16", "half", "bfloat16"] = _opt(
        "auto", "weight and activation dtype ('half' = float16, 'float' = float32); 'auto' is float32 on CPU, "
                "the model's dtype on GPU")
    seed: int = _opt(0, "seed for weights of dummy models and for requests without their own seed")
    disable_log_stats: bool = _opt(False, "do not log the engine's throughput and queues every 10 s "
                                          "(lanner serve)")
    speculative_config: dict | None = _opt(
        None, "speculative decoding, vLLM's JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
              "\"prompt_lookup_min\": 1, \"prompt_lookup_max\": 5}; methods ngram, draft_model, eagle3, mtp (with \"model\": "
              "the draft's folder; lanner-tiny has its own)")

    def __post_init__(self) -> None:
        for section, name, _ in _leaf_fields(type(self)):  # the CLI's choices, for the Python API too
            owner = getattr(self, section) if section else self
            value, choices = getattr(owner, name), _literal_choices(type(owner), name)
            _check(choices is None or value in choices,
                   f"{name} {value!r}: one of {', '.join(map(str, choices or ()))}")
        SpeculativeConfig.of(self.speculative_config)  # refused at once, not at the first request
        sizes = self.graphs.cuda_graph_sizes
        _check(not sizes or min(sizes) <= self.scheduler.max_num_seqs,
               f"cuda_graph_sizes {sizes}: at least one must be at most max_num_seqs ({self.scheduler.max_num_seqs})")
        _check(not (self.moe.enable_return_routed_experts and self.speculative_config),
               "enable_return_routed_experts does not work with speculative decoding yet (a verify step routes "
               "drafts that may be rejected)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat option names (`max_num_seqs=8`), as `LLM(...)` and the CLI pass them."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        owners = {name: section for section, name, _ in _leaf_fields(cls)}
        for key, value in kwargs.items():
            if key not in owners:
                raise ConfigError(f"unknown engine option {key!r}; known: {', '.join(sorted(owners))}")
            section = owners[key]
            (sections.setdefault(section, {}) if section else top)[key] = value
        hints = typing.get_type_hints(cls)
        parts = {name: hints[name](**values) for name, values in sections.items()}
        return cls(**parts, **top)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _leaf_fields(cls: type) -> list[tuple[str | None, str, dataclasses.Field]]:
    """(section, name, field) for every option; section None means EngineConfig itself."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves += [(f.name, f2.name, f2) for f2 in dataclasses.fields(hints[f.name])]
        else:
            leaves.append((None, f.name, f))
    return leaves


def _literal_choices(owner: type, name: str) -> tuple | None:
    """The values a Literal option may take (None among them when it is optional); None: no Literal."""
    tp = typing.get_type_hints(owner)[name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        literals = [a for a in args if typing.get_origin(a) is Literal]
        return typing.get_args(literals[0]) + ((None,) if type(None) in args else ()) if literals else None
    return args if typing.get_origin(tp) is Literal else None


def _field_type(owner: type, name: str) -> Any:
    tp = typing.get_type_hints(owner)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]  # Optional[X] -> X
    return tp


def _add_flag(group: Any, owner: type, f: dataclasses.Field, help: str) -> None:
    tp = _field_type(owner, f.name)
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help}
    if tp is dict or typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp):  # a dataclass: its fields' JSON
        kw["type"] = _json_object
    elif typing.get_origin(tp) is Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is list or typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if typing.get_origin(a) is list]
        kw["nargs"], kw["type"] = "+", typing.get_args(inner[0] if inner else tp)[0]
    else:
        kw["type"] = tp
    if f.default is not dataclasses.MISSING and f.default is not None:
        kw["help"] += f" (default: {f.default})"
    group.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), **kw)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_cli_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per engine option, typed and documented from the dataclasses."""
    group = parser.add_argument_group("engine options")
    hints = typing.get_type_hints(EngineConfig)
    for section, name, f in _leaf_fields(EngineConfig):
        if name not in skip:
            _add_flag(group, EngineConfig if section is None else hints[section], f, f.metadata["help"])


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str,
                       skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a plain dataclass (SamplingParams), help taken from `cls.HELP`."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name not in skip and not f.name.startswith("_"):
            _add_flag(group, cls, f, cls.HELP.get(f.name, ""))


def kwargs_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` (EngineConfig: its options) given on the command line."""
    names = ({name for _, name, _ in _leaf_fields(cls)} if cls is EngineConfig
             else {f.name for f in dataclasses.fields(cls)})
    return {k: v for k, v in vars(args).items() if k in names}


@dataclass
class ServerConfig:
    """Options of `lanner serve` (lives here, not beside the FastAPI app, so the CLI parser builds
    without the server extra installed)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] | None = None
    api_key: str | None = None
    max_waiting_requests: int | None = 1024
    engine_process: bool = True
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    root_path: str | None = None
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    enable_log_requests: bool = False
    disable_log_requests: bool = False
    disable_uvicorn_access_log: bool = False
    max_request_body_mb: float = 32.0
    stream_stall_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    max_prompt_chars: int | None = None
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    chat_template_timeout_s: float = 5.0
    health_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    tool_call_parser: Literal["hermes", "llama3_json"] | None = None  # server/tool_parsers.py's TOOL_PARSERS
    enable_auto_tool_choice: bool = False

    HELP = {
        "host": "address to listen on",
        "port": "port to listen on",
        "served_model_name": "the model names clients may use; the first is reported in responses (default: the "
                             "model folder's name)",
        "api_key": "require 'Authorization: Bearer KEY' on /v1 endpoints, /tokenize and /detokenize (default: "
                   "$LANNER_API_KEY, else $VLLM_API_KEY)",
        "max_waiting_requests": "refuse new requests with 429 while this many are waiting",
        "engine_process": "run the engine loop in its own process, so it never waits for the HTTP "
                          "side's GIL (--no-engine-process: a thread of the server process)",
        "chat_template": "a chat template (its text, or a file) used instead of the tokenizer's",
        "trust_request_chat_template": "let requests bring their own chat template (it is code the server runs)",
        "root_path": "the path prefix under which a proxy serves this app (ASGI root_path)",
        "ssl_keyfile": "serve HTTPS with this private key file (with --ssl-certfile)",
        "ssl_certfile": "serve HTTPS with this certificate file (with --ssl-keyfile)",
        "enable_log_requests": "log one line per generation request (id, prompt tokens, sampling options)",
        "disable_log_requests": "do not log requests (the default; vLLM's older flag)",
        "disable_uvicorn_access_log": "no access log line per HTTP request (uvicorn writes one by default)",
        "max_request_body_mb": "larger request bodies are refused with 413 before they are parsed",
        "stream_stall_timeout_s": "abort a stream whose client reads nothing for this long while output waits",
        "drain_timeout_s": "on SIGTERM, open responses get this long to finish; then each ends with an error "
                           "(a 503 body, or an error event and [DONE])",
        "max_prompt_chars": "longer prompts (or chat messages, together) are refused before tokenizing "
                            "(default: 32 characters per token of the context)",
        "max_stop_strings": "most stop strings a request may give",
        "max_stop_string_chars": "longest stop string a request may give, in characters",
        "chat_template_timeout_s": "longest a chat template may take to render one request (the server's own or, "
                                   "with --trust-request-chat-template, the request's)",
        "health_timeout_s": "/health answers 503 when the engine loop has not answered between two steps for "
                            "this long (a stuck step, a stopped engine process)",
        "header_timeout_s": "close a connection whose request headers have not all arrived this long after it "
                            "opened (or after its previous response)",
        "body_timeout_s": "answer 408 to a request whose body has not all arrived this long after its headers",
        "tool_call_parser": "how the model writes tool calls, read back into tool_calls: hermes (Hermes, Qwen2.5, "
                            "Qwen3: <tool_call>{...}</tool_call>) or llama3_json",
        "enable_auto_tool_choice": "let the model decide when to call tools (tool_choice \"auto\"; needs "
                                   "--tool-call-parser)",
    }

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.enable_log_requests and self.disable_log_requests:
            raise ConfigError("--enable-log-requests and --disable-log-requests contradict each other")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ConfigError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
        for name in ("max_waiting_requests", "max_request_body_mb", "stream_stall_timeout_s", "drain_timeout_s",
                     "max_prompt_chars", "max_stop_strings", "max_stop_string_chars", "chat_template_timeout_s",
                     "health_timeout_s", "header_timeout_s", "body_timeout_s"):
            value, least = getattr(self, name), 0 if name in ("drain_timeout_s", "max_stop_strings") else 1e-9
            if value is not None and value < least:
                raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if least == 0 else 'positive'}, "
                                  f"got {value}")
