"""The small-batch weight GEMV (lanner/kernels/gemv.py) on real shapes against the torch reference,
its split-K merge under CUDA-graph replay, the per-GPU table (lanner/executor/gemv_table.py), and
the engine with it against cuBLAS."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.executor.gemv_table import GemvTable, candidates
from lanner.kernels.gemv import GemvConfig, GemvWorkspace, gemv, gemv_reference

BF16 = [(4096, 1024), (1024, 3072), (6144, 4096), (4096, 12288), (151936, 1024), (1000, 1000), (7, 384)]
CASES = [(n, k, torch.bfloat16) for n, k in BF16] + [(n, k, dtype) for n, k in ((1024, 3072), (1000, 1000))
                                                     for dtype in (torch.float16, torch.float32)]


@pytest.mark.parametrize("n,k,dtype", CASES)
def test_gemv_matches_reference(n, k, dtype):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    for m in (1, 2, 3, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = gemv_reference(x, w).float()
        for config in candidates(m):
            workspace = GemvWorkspace.of(config, n, m, "cuda")
            out = gemv(x, w, config, workspace).float()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=f"{config} m={m}")
            assert not workspace.counters.any()


@pytest.mark.parametrize("n,k", [(1024, 3072), (4096, 12288), (1000, 1000)])
def test_a_gated_gemv_equals_silu_and_mul_then_the_gemv(n, k):
    """A down projection's GEMV applying silu(gate) * up as it loads gate_up (bf16): bit for bit the
    activation kernel followed by the plain GEMV, for every row count and its candidates."""
    from lanner.kernels.fused import silu_and_mul

    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    for m in (1, 3, 8):
        x = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
        for config in candidates(m):
            workspace = GemvWorkspace.of(config, n, m, "cuda")
            want = gemv(silu_and_mul(x), w, config, workspace)
            assert torch.equal(gemv(x, w, config, workspace, gated=True), want), f"{config} m={m}"


@pytest.mark.parametrize("n,k", [(4096, 1024), (6144, 4096), (24576, 4096)])
def test_a_normed_gemv_matches_the_norm_then_the_gemv_in_a_graph(n, k):
    """The projection after an RMSNorm applying it as it loads x (bf16, every row count and its
    candidates): 10 launches in one CUDA graph, each reading the residual the one before wrote (x +
    residual into a tensor of its own, as the decoder layers chain them), against the add + RMSNorm
    kernel followed by the plain GEMV, 10 times in another: the last residuals equal bit for bit, the
    outputs within bf16's rounding (1/RMS applied after the product, the squares summed in another
    order)."""
    from lanner.kernels.fused import rms_norm
    from lanner.kernels.fused_reference import Norm

    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    weight = 1 + 0.1 * torch.randn(k, device="cuda", dtype=torch.bfloat16)
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        start = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for config in candidates(m):
            workspace = GemvWorkspace.of(config, n, m, "cuda")
            residuals = [start.clone()] + [torch.full_like(start, float("nan")) for _ in range(10)]
            unfused = start.clone()
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(20)]
            # each kernel's first launch outside the capture (it loads its module there)
            gemv(x, w, config, workspace, norm=Norm.of(weight, 1e-6, x, start))
            gemv(rms_norm(x, weight, 1e-6, unfused.clone())[0], w, config, workspace)
            torch.cuda.synchronize()
            graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
            with torch.cuda.graph(graphs[0]):
                for i, out in enumerate(outs[:10]):
                    gemv(x, w, config, workspace, out=out, norm=Norm(weight, 1e-6, residuals[i], residuals[i + 1]))
            with torch.cuda.graph(graphs[1]):
                for out in outs[10:]:
                    gemv(rms_norm(x, weight, 1e-6, unfused)[0], w, config, workspace, out=out)
            for graph in graphs:
                graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(residuals[-1], unfused), f"{config} m={m}"
            assert torch.equal(residuals[0], start) and not workspace.counters.any()
            torch.testing.assert_close(torch.stack(outs[:10]).float(), torch.stack(outs[10:]).float(), atol=3e-2,
                                       rtol=3e-2, msg=f"{config} m={m}")


def test_split_k_merge_is_race_free_in_a_graph():
    """50 split-K GEMVs in one CUDA graph over one workspace whose partials are NaN before each
    (a merge that read a partial before its write landed would give NaN), replayed 3 times: every
    output equal to the eager one, bit for bit, and the counts back at zero."""
    torch.manual_seed(0)
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for config, m in ((GemvConfig(16, 256, 8, 4, 3), 1), (GemvConfig(64, 128, 8, 4, 4), 5)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        workspace = GemvWorkspace.of(config, n, m, "cuda")
        want = gemv(x, w, config, workspace)
        outs = [torch.empty_like(want) for _ in range(50)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for out in outs:
                workspace.partials.fill_(float("nan"))
                gemv(x, w, config, workspace, out=out)
        for _ in range(3):
            for out in outs:
                out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(out, want) for out in outs)
            assert not workspace.counters.any()


@pytest.mark.parametrize("config,rows", [(GemvConfig(16, 256, 8, 4, 3), 1), (GemvConfig(4, 1024, 1, 8, 3), 1),
                                         (GemvConfig(64, 128, 2, 4, 4), 4)], ids=str)
def test_a_dependent_launch_chain_gives_the_plain_chains_bits(config, rows):
    """20 GEMVs in a CUDA graph, each multiplying the one before's output (split-K and one split,
    one row and four), launched with programmatic dependent launch (each scheduled while the one
    before runs, waiting inside for it): the same bits as launched plainly, nothing left unwritten."""
    from lanner.kernels import set_dependent_launch

    torch.manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    start = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    chains = {}
    try:
        for on in (False, True):
            set_dependent_launch(on)
            workspace = GemvWorkspace.of(config, 4096, rows, "cuda")
            xs = [start] + [torch.full_like(start, float("nan")) for _ in range(20)]
            gemv(start, w, config, workspace)  # the module loads outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(20):
                    gemv(xs[i], w, config, workspace, out=xs[i + 1])
            graph.replay()
            torch.cuda.synchronize()
            chains[on] = torch.cat(xs)
    finally:
        set_dependent_launch(False)
    assert not chains[True].isnan().any() and torch.equal(chains[True], chains[False])


def test_table_is_measured_once_and_kept(tmp_path):
    path = tmp_path / "gemv.json"
    first = GemvTable("cuda", path)
    picks = [first.choice(1024, 3072, m, torch.bfloat16) for m in (1, 3, 8)]
    assert first.measured == 3  # rows 3 and 4 share a bucket; 1, 4 and 8 are measured
    first.save()
    again = GemvTable("cuda", path)
    assert [again.choice(1024, 3072, m, torch.bfloat16) for m in (1, 3, 8)] == picks
    assert again.measured == 0
    entry = again.entries["1024x3072/m1/bfloat16"]
    assert set(entry["us"]) == {"cublas"} | {str(c) for c in candidates(1)}


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:", "for i in range(10):", "# Parse"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_the_gemv_everywhere_matches_cublas(dtype, tmp_path, monkeypatch):
    """Decode batches of 1-5 rows through the Triton GEMV in every linear and the LM head (forced),
    against cuBLAS: the same greedy tokens (float32), or nearly (bf16: sums in another order)."""
    monkeypatch.setenv("LANNER_CACHE_DIR", str(tmp_path))
    runs = {}
    for choice in ("cublas", "triton"):
        llm = LLM(dtype=dtype, gemv_kernels=choice, gpu_memory_utilization=0.3)
        runner = llm.engine.runner
        if choice == "triton":
            layers = [mod for mod in runner.model.modules() if getattr(mod, "gemv", None)]
            assert len(layers) >= 4 * 8 + 1 and all(set(mod.gemv) == set(range(1, 9)) for mod in layers)
        runs[choice] = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS[:b], GREEDY, use_tqdm=False)]
                        for b in (1, 5)]
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    pairs = [(a, b) for batch_t, batch_c in zip(runs["triton"], runs["cublas"]) for a, b in zip(batch_t, batch_c)]
    # a wrong GEMV changes the first tokens; sums in another order may flip a near-tie later
    assert all(a[:8] == b[:8] for a, b in pairs) or dtype == "bfloat16", runs
    assert sum(a == b for a, b in pairs) >= (5 if dtype == "float32" else 4), runs


RESTART = """
import json, sys
from lanner import LLM, SamplingParams
llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
print(json.dumps({"report": llm.engine.runner.gemv_report, "tokens": out[0].outputs[0].token_ids}))
"""


def test_a_restart_reads_the_table_and_captures_its_kernels(tmp_path):
    """A second process finds every choice in the cache file (measures nothing), so it launches no
    kernel before its decode graphs are captured but the ones load_kernels runs: capture works,
    and the tokens are the first process's (the same kernels)."""
    env = {**os.environ, "LANNER_CACHE_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", RESTART], check=False, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["report"]["measured"] > 0 and runs[1]["report"]["measured"] == 0
    assert runs[1]["report"]["choices"] == runs[0]["report"]["choices"]
    assert runs[1]["tokens"] == runs[0]["tokens"]
