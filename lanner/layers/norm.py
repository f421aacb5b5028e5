import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, adds x to it in place and returns (normed, residual), as
        decoder layers chain them."""
        if x.is_cuda and x.dim() == 2:
            from lanner.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:  # in place, as the CUDA kernel does: graph pieces rely on it
            residual.add_(x)
            x = residual
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(dtype)
        return out if residual is None else (out, residual)
