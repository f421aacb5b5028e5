"""How a MoE layer runs its experts: a registry of strategies, each with a capability probe.

- masked (Triton): per-expert slots of fixed capacity and per-expert counts on the device, a
  3-D layout whose grid does not depend on the routing, so decode graphs replay it;
- contiguous (Triton): entries sorted by expert into block-aligned segments (prefill and
  large batches);
- reference (torch): always available; what the others are tested against.

`auto` picks masked up to `masked_max_tokens` tokens and contiguous above (a measured
crossover, docs/moe.md). A probe answers (ok, reason) and never raises; a refused strategy
falls back to the reference, logged once per reason."""
from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lanner.kernels.moe.reference import moe_reference, moe_reference_dense

logger = logging.getLogger(__name__)

Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Run  # (x, w13, w2, ids, weights) -> out
    probe: Callable[[torch.Tensor, torch.Tensor], tuple[bool, str]]  # (x, w13) -> (ok, reason)


def _reference(x, w13, w2, ids, weights):
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return moe_reference_dense(x, w13, w2, ids, weights)
    return moe_reference(x, w13, w2, ids, weights)


def _always(x, w13) -> tuple[bool, str]:
    return True, ""


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_probe(x: torch.Tensor, w13: torch.Tensor) -> tuple[bool, str]:
    try:
        if not x.is_cuda:
            return False, "the Triton MoE executors run on CUDA tensors"
        if not _has_triton():
            return False, "triton is not installed"
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w13.dtype != x.dtype:
            return False, f"activations {x.dtype} and expert weights {w13.dtype} are not one float type"
        if not (x.is_contiguous() and w13.is_contiguous()):
            return False, "non-contiguous activations or expert weights"
        return True, ""
    except Exception as e:  # a probe answers, never raises
        return False, f"probe failed: {e!r}"


def _triton(layout: str) -> Run:
    def run(x, w13, w2, ids, weights):
        from lanner.kernels.moe.fused import fused_moe

        return fused_moe(x, w13, w2, ids, weights, layout=layout)
    return run


STRATEGIES = {
    "masked": Strategy("masked", _triton("masked"), _triton_probe),
    "contiguous": Strategy("contiguous", _triton("contiguous"), _triton_probe),
    "reference": Strategy("reference", _reference, _always),
}


@dataclass
class MoERuntime:
    """What the MoE layers of one model share: the choice of strategy, the step's real token
    count on the device (rows past it are graph padding) and the routing record."""
    backend: str = "auto"
    masked_max_tokens: int = 256
    num_real_tokens: torch.Tensor | None = None  # [1] long, rewritten every step
    routing: torch.Tensor | None = None  # [max tokens, MoE layers, top_k] int32: each layer's choices
    _probed: dict = field(default_factory=dict)  # (strategy asked for, input kind) -> the one that runs

    def choice(self, num_tokens: int, on_cuda: bool) -> str:
        """The executor asked for at this step size (on the CPU, `auto` means the reference: it is
        the executor there, not a fallback)."""
        if self.backend != "auto":
            return self.backend
        if not on_cuda:
            return "reference"
        return "masked" if num_tokens <= self.masked_max_tokens else "contiguous"

    def strategy(self, x: torch.Tensor, w13: torch.Tensor) -> Strategy:
        name = self.choice(x.shape[0], x.is_cuda)
        key = (name, x.device.type, x.dtype, w13.dtype, x.is_contiguous(), w13.is_contiguous())
        if key not in self._probed:  # once per kind of input, not per layer and step
            ok, reason = STRATEGIES[name].probe(x, w13)
            if not ok:
                logger.warning("MoE executor %r refused (%s): running the torch reference", name, reason)
            self._probed[key] = name if ok else "reference"
        return STRATEGIES[self._probed[key]]
