"""Torch references of the fused elementwise kernels (fused.py); no Triton here."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Norm(NamedTuple):
    """An RMSNorm applied by the next kernel to its input x (the small-batch GEMV: kernels/gemv.py):
    its weight and eps, the residual x is added to first (None: x alone), and where x + residual
    goes (`added`: the residual after the norm; the add + RMSNorm kernel writes it in place)."""
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None
    added: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: torch.Tensor, eps: float, x: torch.Tensor, residual: torch.Tensor | None) -> Norm:
        """The norm of x (+ residual), with a new tensor for x + residual where there is one."""
        return cls(weight, eps, residual, None if residual is None else torch.empty_like(x))

    def residual_after(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the norm of x: x + residual, or x itself (the first layer)."""
        return x if self.residual is None else self.added


def rms_norm_ref(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    out = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, residual)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def norm_rope_ref(x, cos, sin, weight=None, eps=1e-6, second_weight_from=None):
    if weight is not None and weight.dim() == 2:
        h = second_weight_from
        x = torch.cat([rms_norm_ref(x[:, :h], weight[0], eps), rms_norm_ref(x[:, h:], weight[1], eps)], dim=1)
    elif weight is not None:
        x = rms_norm_ref(x, weight, eps)
    return apply_rotary(x, cos, sin)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
