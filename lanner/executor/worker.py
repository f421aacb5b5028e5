"""Tensor-parallel ranks (docs/parallel.md).

Rank 0 runs the engine (scheduler, server, detokenizer); before each step it sends every other
rank the step's plan, and every rank runs the same ModelRunner on its shard of the model. The
ranks sample too, from the same gathered logits and per-request seeds, so each holds the step's
tokens on its device for the next step (overlap scheduling) without another transfer.

A plan carries what the runner reads of each request: a copy of the request when the ranks
first see it, then per step the fields that change, its new block ids and tokens. The other
ranks keep those copies (`Mirror`) until rank 0 says the request is gone.

Ranks start in one of three ways: lanner spawns them on this machine (`start_local_ranks`);
each machine of several runs `lanner ... --nnodes N --node-rank i` and spawns its own; or
torchrun starts every process (RANK, WORLD_SIZE, LOCAL_RANK in the environment) and the
processes of rank > 0 become workers (`run_worker`)."""
from __future__ import annotations

import copy
import datetime
import logging
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lanner.config import EngineConfig, SpeculativeConfig
from lanner.core.heap import freeze_heap
from lanner.core.request import Request
from lanner.core.schedule import SchedulerOutput
from lanner.distributed import TP, die_with_parent
from lanner.errors import ConfigError

logger = logging.getLogger(__name__)

# what the runner and the sampler read of a request that changes from step to step (tokens and
# blocks travel separately, as what is new)
STEP_FIELDS = ("num_computed_tokens", "num_pending", "draft_token_ids", "drafts_on_device", "speculative",
               "spec_pause", "spec_probing", "status")


@dataclass
class RankArgs:
    """What rank 0 resolved that every rank builds its runner from."""
    config: EngineConfig
    path: str
    tokenizer_path: str
    dtype: torch.dtype
    device_type: str
    max_model_len: int
    init_method: str
    world_size: int


@dataclass
class RequestUpdate:
    request_id: str
    fields: tuple
    new_tokens: list[int]
    blocks: list[int]  # appended block ids, or the whole list when `replace_blocks`
    replace_blocks: bool
    num_prompt_logprobs: int | None


@dataclass
class StepPlan:
    new: list[Request] = field(default_factory=list)
    updates: list[RequestUpdate] = field(default_factory=list)
    scheduled: list[tuple[str, int]] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    drafts: dict[str, list[int]] = field(default_factory=dict)
    unread_drafts: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)


# ---- process groups ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join_group(rank: int, world_size: int, local_rank: int, init_method: str, device_type: str,
               config: EngineConfig) -> None:
    """Join the ranks' process group and set TP (NCCL between GPUs, gloo between CPU processes;
    the plans always travel over gloo)."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():
        raise ConfigError("this process already belongs to a tensor-parallel group (one engine with "
                          "tensor_parallel_size > 1 per process)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=config.parallel.distributed_timeout_s))
    TP.rank, TP.size, TP.group = rank, world_size, dist.group.WORLD
    TP.expert_parallel = config.parallel.enable_expert_parallel
    # the ranks wait for plans as long as the engine stays idle; a rank 0 that dies closes the
    # connection, which ends the wait at once
    TP.plans = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    TP.reset()


def min_over_ranks(n: int) -> int:
    """The smallest of every rank's `n` (KV blocks: each rank's memory may differ a little)."""
    if TP.size == 1:
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=TP.plans)
    return int(t.item())


# ---- rank 0 ------------------------------------------------------------------------------

class Ranks:
    """Rank 0's side: the worker processes it started (on this machine) and the plans it sends."""

    def __init__(self, processes: list):
        self.processes = processes
        self.known: dict[str, Request] = {}  # requests the other ranks hold a copy of
        # per request: tokens sent, the block list object sent from and how many of its ids (the KV
        # cache only appends to a request's list, or gives it a new one when it frees its blocks)
        self.sent: dict[str, tuple[int, list[int], int]] = {}

    def send(self, sched: SchedulerOutput) -> None:
        dist.broadcast_object_list([self.plan(sched)], src=0, group=TP.plans)

    def plan(self, sched: SchedulerOutput) -> StepPlan:
        plan = StepPlan(gone=[rid for rid, req in self.known.items() if req.finished])
        for rid in plan.gone:
            del self.known[rid], self.sent[rid]
        for req, n in sched.scheduled:
            rid = req.request_id
            if rid not in self.known:
                plan.new.append(snapshot(req))
                self.known[rid] = req
                self.sent[rid] = (len(req.all_token_ids), req.block_ids, len(req.block_ids))
            num_tokens, blocks, num_blocks = self.sent[rid]
            appended = blocks is req.block_ids
            count = None if req.prompt_logprobs is None else len(req.prompt_logprobs)
            plan.updates.append(RequestUpdate(rid, tuple(getattr(req, f) for f in STEP_FIELDS),
                                              req.all_token_ids[num_tokens:],
                                              req.block_ids[num_blocks:] if appended else list(req.block_ids),
                                              not appended, count))
            self.sent[rid] = (len(req.all_token_ids), req.block_ids, len(req.block_ids))
            plan.scheduled.append((rid, n))
        plan.preempted = [r.request_id for r in sched.preempted if r.request_id in self.known]
        plan.drafts = {r.request_id: d for r, d in sched.drafts.items()}
        plan.unread_drafts = [r.request_id for r in sched.unread_drafts]
        return plan

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the ranks to exit (best effort: some may be gone), then make sure they are."""
        try:
            dist.broadcast_object_list([None], src=0, group=TP.plans)
        except Exception as e:  # noqa: BLE001 (a rank that is gone is stopped below either way)
            logger.info("telling the ranks to stop failed: %s", e)
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout)
        leave_group()

    def kill(self) -> None:
        """After a failure: the ranks may be stuck in a collective that never completes."""
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(10.0)
        try:
            leave_group()
        except Exception:  # noqa: BLE001 (a broken group may refuse to be torn down; TP is reset anyway)
            TP.reset()


def snapshot(req: Request) -> Request:
    """A copy of `req` to send: what the runner reads, without what only rank 0 needs (its text,
    logprobs, routing records); prompt logprobs travel as a count."""
    copied = copy.copy(req)
    copied.logprobs = None
    copied.prompt_logprobs = None if req.prompt_logprobs is None else [None] * len(req.prompt_logprobs)
    copied.routed_experts = None if req.routed_experts is None else []
    copied.output_text = ""
    copied.all_token_ids, copied.output_token_ids = list(req.all_token_ids), list(req.output_token_ids)
    copied.block_ids = list(req.block_ids)
    return copied


def start_ranks(config: EngineConfig, path: str, tokenizer_path: str, dtype: torch.dtype, max_model_len: int,
                device_type: str) -> Ranks | None:
    """Rank 0 of a tensor-parallel engine: start this machine's other ranks (none under torchrun,
    which started them) and join the group. None without tensor parallelism. A process that only
    hosts other ranks (torchrun's rank > 0, a machine of --node-rank > 0) runs them here until
    rank 0 stops them, then exits (SystemExit)."""
    pc = config.parallel
    size = pc.tensor_parallel_size
    if size == 1:
        return None
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun and int(os.environ["WORLD_SIZE"]) != size:
        raise ConfigError(f"torchrun started {os.environ['WORLD_SIZE']} processes for tensor_parallel_size {size}")
    init_method = "env://" if torchrun else f"tcp://{pc.master_addr}:{pc.master_port or free_port()}"
    args = RankArgs(config, path, tokenizer_path, dtype, device_type, max_model_len, init_method, size)
    if torchrun and int(os.environ["RANK"]) > 0:
        run_worker(args, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))
        raise SystemExit(0)
    processes = [] if torchrun else spawn_local_ranks(args, pc.node_rank)
    if pc.node_rank > 0:  # this machine hosts ranks only
        for p in processes:
            p.join()
        raise SystemExit(max((p.exitcode or 0 for p in processes), default=0))
    try:
        join_group(0, size, int(os.environ.get("LOCAL_RANK", "0")), init_method, device_type, config)
    except BaseException:
        Ranks(processes).kill()
        raise
    return Ranks(processes)


def hosts_ranks_only(config: EngineConfig) -> bool:
    """This process runs no engine, only other ranks (so `lanner serve` starts no server)."""
    if config.parallel.tensor_parallel_size == 1:
        return False
    return config.parallel.node_rank > 0 or int(os.environ.get("RANK", "0")) > 0


def spawn_local_ranks(args: RankArgs, node_rank: int) -> list:
    """This machine's ranks after its first: node i holds ranks [i * per_node, (i + 1) * per_node)."""
    import multiprocessing

    per_node = args.world_size // args.config.parallel.nnodes
    ctx = multiprocessing.get_context("spawn")  # a forked child would share rank 0's CUDA state
    first = node_rank * per_node
    processes = [ctx.Process(target=run_worker, args=(args, first + i, i), daemon=True, name=f"lanner-rank-{first + i}")
                 for i in range(1 if node_rank == 0 else 0, per_node)]
    for p in processes:
        p.start()
    return processes


# ---- the other ranks ---------------------------------------------------------------------

class Mirror:
    """A rank's copies of the requests rank 0 scheduled, kept current by its plans."""

    def __init__(self):
        self.requests: dict[str, Request] = {}

    def apply(self, plan: StepPlan) -> SchedulerOutput:
        for rid in plan.gone:
            self.requests.pop(rid, None)
        for req in plan.new:
            self.requests[req.request_id] = req
        for u in plan.updates:
            req = self.requests[u.request_id]
            for name, value in zip(STEP_FIELDS, u.fields):
                setattr(req, name, value)
            req.all_token_ids += u.new_tokens
            req.output_token_ids += u.new_tokens
            if u.replace_blocks:
                req.block_ids = u.blocks
            else:
                req.block_ids.extend(u.blocks)
            if u.num_prompt_logprobs is not None:
                req.prompt_logprobs += [None] * (u.num_prompt_logprobs - len(req.prompt_logprobs))
        get = self.requests.__getitem__
        return SchedulerOutput([(get(rid), n) for rid, n in plan.scheduled], [get(r) for r in plan.preempted],
                               {get(r): d for r, d in plan.drafts.items()}, {get(r) for r in plan.unread_drafts})


def run_worker(args: RankArgs, rank: int, local_rank: int) -> None:
    """A rank after the first: join the group, build the runner on this rank's shard, then run
    each step rank 0 plans until it says stop. Any error ends the process at once, so rank 0's
    next collective fails instead of waiting."""
    from lanner.executor.model_runner import build_runner
    from lanner.models.loader import load_model
    from lanner.sampling.speculative import make_proposer

    config = args.config
    if local_rank > 0 or args.config.parallel.node_rank > 0:  # started by lanner: end with the process that did
        die_with_parent()
    try:
        device = torch.device(args.device_type)
        join_group(rank, args.world_size, local_rank, args.init_method, device.type, config)
        torch.manual_seed(config.seed)
        mc = config.model
        loaded = load_model(args.path, args.tokenizer_path, mc.load_format, args.dtype, device, config.seed, mc.hf_overrides,
                            mc.generation_config)
        speculative = SpeculativeConfig.of(config.speculative_config)
        runner = build_runner(config, loaded, args.path, device, args.dtype, args.max_model_len,
                              make_proposer(speculative) if speculative is not None else None)
        runner.reads_back = runner.sampler.logprobs = False  # rank 0 reads the results back
        freeze_heap()
        mirror = Mirror()
        fail_at = int(os.environ.get("LANNER_TEST_RANK_FAILS_AT_STEP", "-1"))  # tests: a rank that raises
        step = 0
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=TP.plans)
            if box[0] is None:
                break
            step += 1
            if step == fail_at:
                raise RuntimeError(f"rank {rank} fails at step {step} (LANNER_TEST_RANK_FAILS_AT_STEP)")
            runner.launch(mirror.apply(box[0]))
        leave_group()
    except BaseException:
        logger.exception("tensor-parallel rank %d failed; exiting", rank)
        os._exit(1)
