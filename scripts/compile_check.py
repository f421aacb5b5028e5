"""Compile Triton kernels for a Hopper GPU (sm_90) on a machine without one: the CPU tests run the
kernels in Triton's interpreter, which accepts code the GPU compiler may not (control flow inside
loops, say), and a GPU session may not come soon. Triton's wheel carries its compiler and ptxas,
so `triton.compile` for a GPUTarget works anywhere. Covers the kernels changed in the ninth session
(the top-p search with its block skip, the add + RMSNorm with its warps), the twelfth (the GEMV
with its gated and normed inputs) and the thirteenth (the GEMV's normed input again, decode
attention's split count a sequence, programmatic dependent launch) and the sixteenth (prefill
attention's programs, KV heads fastest); add others as they change.
Written for Triton 3.9's ASTSource(fn, signature, constexprs). Usage: python scripts/compile_check.py"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lanner.kernels.attention.decode import _decode_split_kernel
from lanner.kernels.attention.prefill import _prefill_kernel
from lanner.kernels.fused import _rms_norm_kernel, rms_norm_warps
from lanner.kernels.gemv import _gemv_kernel
from lanner.kernels.top_p import PASSES, PIVOTS, _top_p_pass

HOPPER = GPUTarget("cuda", 90, 32)


def check(name: str, fn, signature: dict, constexprs: dict, num_warps: int = 4) -> None:
    signature = signature | dict.fromkeys(constexprs, "constexpr")
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER,
                            options={"num_warps": num_warps})
    print(f"{name}: {len(kernel.asm['cubin'])} bytes of sm_90 code, {kernel.metadata.num_warps} warps")


def main() -> None:
    top_p = {"probs_ptr": "*fp32", "stride": "i32", "top_p_ptr": "*fp32", "bounds_ptr": "*i32", "sums_ptr": "*fp32",
             "out_ptr": "*fp32", "B": "i32", "V": "i32", "num_splits": "i32"}
    for pivots, passes in ((PIVOTS, PASSES), (16, 8), (8, 10)):
        for step in (0, 1, passes):
            for skip in (True, False):
                check(f"top-p pass {step}/{passes}, {pivots} pivots, skip {skip}", _top_p_pass, top_p,
                      {"PASS": step, "FINAL": step == passes, "NP": pivots, "SPLITS": 64, "CHUNK_SIZE": 4096,
                       "BLOCK": 256, "SKIP": skip})
    norm = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "stride_x": "i32",
            "stride_r": "i32", "stride_o": "i32", "N": "i32", "eps": "fp32"}
    for block in (1024, 4096):
        check(f"add + RMSNorm, {block} wide", _rms_norm_kernel, norm, {"HAS_RES": True, "BLOCK": block, "PDL": True},
              rms_norm_warps(block))
    gemv = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "counter_ptr": "*i32",
            "res_ptr": "*bf16", "norm_w_ptr": "*bf16", "added_ptr": "*bf16", "eps": "fp32", "M": "i32", "N": "i32",
            "K": "i32", "stride_xm": "i32", "stride_rm": "i32", "stride_am": "i32", "stride_wn": "i32",
            "stride_om": "i32"}
    inputs = {"plain": (False, False, False), "gated": (True, False, False), "normed": (False, True, True),
              "normed, no residual": (False, True, False)}
    for block_m, split_k, even_k in ((1, 1, True), (1, 8, True), (16, 1, False), (16, 4, True)):
        for name, (gated, norm, has_res) in inputs.items():
            check(f"GEMV {block_m} rows, split {split_k}, even K {even_k}, {name}", _gemv_kernel, gemv,
                  {"BLOCK_M": block_m, "BLOCK_N": 16 if block_m == 1 else 64, "BLOCK_K": 256 if block_m == 1 else 128,
                   "SPLIT_K": split_k, "EVEN_K": even_k, "PRECISION": "tf32", "GATED": gated, "NORM": norm,
                   "HAS_RES": has_res, "PDL": block_m == 1})

    decode = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32",
              "seq_lens_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "counter_ptr": "*i32",
              "out_ptr": "*bf16", "scale": "fp32", "v_scale": "fp32", "stride_qt": "i32", "stride_qh": "i32",
              "stride_ot": "i32", "stride_oh": "i32", "stride_kb": "i32", "stride_ks": "i32", "stride_kh": "i32",
              "stride_bt": "i32"}
    for cache in ("*bf16", "*fp8e4nv"):
        for splits in (1, 16):
            check(f"decode attention, {cache[1:]} cache, {splits} splits", _decode_split_kernel,
                  decode | {"k_cache_ptr": cache, "v_cache_ptr": cache},
                  {"NUM_HEADS": 16, "GROUP": 2, "GROUP_PAD": 16, "HEAD_DIM": 128, "PAGE": 16, "NUM_SPLITS": splits,
                   "MIN_SPLIT_KEYS": 64, "ONE_SPLIT_KEYS": 128,
                   "BLOCK_N": 64, "PRECISION": "tf32", "PDL": splits == 16})

    prefill = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
               "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_ptr": "*i32", "tiles_ptr": "*i32",
               "scale": "fp32", "v_scale": "fp32", "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32",
               "stride_oh": "i32", "stride_kb": "i32", "stride_ks": "i32", "stride_kh": "i32", "stride_bt": "i32"}
    for cache in ("*bf16", "*fp8e4nv"):
        for rows, keys, warps in ((32, 128, 4), (128, 128, 8)):
            check(f"prefill attention, {cache[1:]} cache, {rows} x {keys} tile", _prefill_kernel,
                  prefill | {"k_cache_ptr": cache, "v_cache_ptr": cache},
                  {"GROUP": 2, "GROUP_PAD": 2, "HEAD_DIM": 128, "PAGE": 16, "BLOCK_M": rows, "BLOCK_N": keys,
                   "KV_HEADS": 8, "PRECISION": "tf32"}, warps)


if __name__ == "__main__":
    main()
