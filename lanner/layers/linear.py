"""Linear layers whose weights are loaded from checkpoint tensors, possibly
several checkpoint tensors stacked into one (q/k/v, gate/up) so one matmul
serves them all.

Under tensor parallelism (lanner/distributed.py) a layer holds one rank's shard:
column-parallel layers a slice of the outputs (each rank computes its own), row-parallel
layers a slice of the inputs (the partial outputs are summed over the ranks: one all-reduce,
then the bias). `checkpoint_slice` cuts this rank's piece out of a whole checkpoint tensor."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lanner.distributed import TP, all_reduce
from lanner.kernels.fused_reference import Norm

Parallel = Literal["column", "row"] | None


class Linear(nn.Module):
    """`in_features` and `out_features` are this rank's (already divided); `shard_index`: which
    slice of the checkpoint the layer holds (the rank, unless a column-parallel layer's slices are
    replicated)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: Parallel = None,
                 shard_index: int | None = None, reduce: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.parallel = parallel if TP.size > 1 else None
        self.num_ranks = TP.size
        self.shard_index = TP.rank if shard_index is None else shard_index
        # row-parallel without the all-reduce: the caller sums this output with others first
        self.reduce = reduce
        self.gemv, self.gemv_workspace = {}, None  # small-batch kernels, set by the runner (gemv_table.py)
        self.fused_rows = frozenset()  # row counts whose GEMV does its input kind's work (`fuses`), likewise
        # what the layer's input is when its GEMV runs, as its GEMVs are measured (gemv_table.py): "plain",
        # "gated" (a gated MLP's gate and up: matmul's `gated`) or "normed" (before an RMSNorm: matmul's `norm`)
        self.input_kind = "plain"

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, gated: bool = False,
                norm: Norm | None = None) -> torch.Tensor:
        if self.parallel == "row":
            y = matmul(x, self.weight, self, out=out, gated=gated, norm=norm)
            if self.reduce:
                all_reduce(y)
            return y if self.bias is None else y.add_(self.bias / (1 if self.reduce else self.num_ranks))
        return matmul(x, self.weight, self, self.bias, out, gated, norm)

    def checkpoint_slice(self, param: torch.Tensor, tensor: torch.Tensor, shard=None) -> torch.Tensor:
        """This rank's piece of the whole checkpoint tensor for `param`."""
        if self.parallel == "row" and param is self.weight:
            return tensor.narrow(1, self.shard_index * param.shape[1], param.shape[1])
        if self.parallel == "column":
            rows = param.shape[0]
            return tensor.narrow(0, self.shard_index * rows, rows)
        return tensor


def gemv_config(layer: nn.Module, x: torch.Tensor):
    """The Triton GEMV configuration for x's row count, if the runner measured one faster than
    cuBLAS for this layer (`layer.gemv`: {rows: config}); else None."""
    return layer.gemv.get(x.shape[0]) if layer.gemv and x.dim() == 2 and x.stride(1) == 1 else None


def fuses(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer's GEMV, for x's row count, does the work its input kind needs first
    (`input_kind`: the activation, the norm): the runner measured that faster than the kernel before
    it followed by the plain GEMV or cuBLAS."""
    return x.shape[0] in layer.fused_rows and gemv_config(layer, x) is not None


def matmul(x: torch.Tensor, weight: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, gated: bool = False, norm: Norm | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias), into `out` (a static buffer of graph pieces) if given: the Triton GEMV
    where `gemv_config` has one, else cuBLAS. In the GEMV only (callers check `fuses` first):
    `gated`, x holds a gated MLP's gate and up halves and the product is silu(gate) * up @ weight^T;
    `norm`, the product is RMSNorm's output @ weight^T (kernels/gemv.py Norm)."""
    config = gemv_config(layer, x)
    if config is not None and (out is None or out.stride(1) == 1):
        from lanner.kernels.gemv import gemv

        y = gemv(x, weight, config, layer.gemv_workspace, out, gated, norm)
    elif gated or norm is not None:
        raise ValueError("a gated or normed input needs the GEMV: no configuration for this row count or output")
    elif out is None:
        return F.linear(x, weight, bias)
    else:
        y = torch.mm(x, weight.t(), out=out)
    return y if bias is None else y.add_(bias)


class MergedLinear(Linear):
    """Outputs of several checkpoint linears, concatenated along the output dim; column-parallel
    with `shard_indices`, this rank's slice of each (`out_sizes` are the slices' sizes)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 shard_indices: list[int] | None = None):
        super().__init__(in_features, sum(out_sizes), bias, "column" if shard_indices else None)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]
        self.shard_indices = shard_indices

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        return param.narrow(0, self.offsets[index], self.offsets[index + 1] - self.offsets[index])

    def checkpoint_slice(self, param: torch.Tensor, tensor: torch.Tensor, shard=None) -> torch.Tensor:
        if self.parallel is None:
            return tensor
        rows = self.offsets[shard + 1] - self.offsets[shard]
        return tensor.narrow(0, self.shard_indices[shard] * rows, rows)
