"""Mixture-of-experts kernels: a fused Triton executor over two layouts of the routed entries,
with torch references in reference.py:

- align.py:   the layouts, built on the device (fixed-size outputs, CUDA-graph capturable)
- fused.py:   fused_moe: grouped gate/up GEMM with SiLU-and-mul, grouped down GEMM with the
              router weight, then a per-token combine
- configs.py: tile configs, tuned per GPU (scripts/tune_moe.py) or defaults by token count

Importing this package imports no Triton: the CPU path uses the reference alone.
"""
