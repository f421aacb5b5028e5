"""The gated MLP of Llama-family layers (and of MoE shared experts): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lanner.distributed import TP
from lanner.kernels.fused_reference import Norm
from lanner.layers.linear import Linear, MergedLinear, fuses


class GatedMLP(nn.Module):
    """`intermediate_size`: this rank's (tensor parallelism splits the features: gate/up are
    column-parallel, down row-parallel); `reduce`: sum the ranks' outputs here (False: the
    caller sums them with another output first, one all-reduce for both)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                         shard_indices=[TP.rank] * 2 if TP.size > 1 else None)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, parallel="row", reduce=reduce)
        self.down_proj.input_kind = "gated"

    def forward(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """`norm`: x is the RMSNorm's input, applied by gate_up's GEMV (DecoderLayer.post_attention)."""
        gate_up = self.gate_up_proj(x, norm=norm)
        if fuses(self.down_proj, gate_up):  # its GEMV applies silu(gate) * up as it loads them
            return self.down_proj(gate_up, gated=True)
        if x.is_cuda:
            from lanner.kernels.fused import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
