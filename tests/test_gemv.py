"""The small-batch weight GEMV (lanner/kernels/gemv.py) against the torch reference on the CPU
(TRITON_INTERPRET=1, float32), the layers' routing to it, and the choice table's rules
(lanner/executor/gemv_table.py) with the GPU's measurements stubbed."""
from __future__ import annotations

import pytest
import torch

import lanner.kernels.gemv as gemv_kernel
from lanner import LLM, SamplingParams
from lanner.errors import ConfigError
from lanner.executor import gemv_table
from lanner.executor.gemv_table import GemvTable, candidates, row_bucket
from lanner.kernels.fused_reference import Norm
from lanner.kernels.gemv import GemvConfig, GemvWorkspace, gemv, gemv_reference
from lanner.layers.embedding import LMHead, VocabEmbedding
from lanner.layers.linear import Linear
from lanner.layers.mlp import GatedMLP

SMALL_CONFIGS = [GemvConfig(8, 64, 1, 4, 2), GemvConfig(16, 32, 4, 4, 2), GemvConfig(16, 64, 3, 4, 2)]


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize("n,k", [(72, 256), (5, 100), (40, 30)])
def test_gemv_matches_reference(config, n, k):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    workspace = GemvWorkspace.of(config, n, 16, "cpu")  # the most rows: big enough for fewer
    for m in (1, 3, 16):
        x = torch.randn(m, k)
        for _ in range(2):  # the split counts are back at zero for the next call
            torch.testing.assert_close(gemv(x, w, config, workspace), gemv_reference(x, w), atol=1e-4, rtol=1e-4)
            assert not workspace.counters.any()


def test_two_weight_rows_a_program_at_one_row():
    """The one-row candidates of 2 and 4 weight rows a program (the H100's choices for Qwen3-8B's
    projections; the tensor cores' path needs 16, so they run only at one row), plain, gated and
    normed, odd N and a masked K tail."""
    from lanner.kernels.fused import rms_norm, silu_and_mul

    torch.manual_seed(0)
    for config in (GemvConfig(2, 128, 1, 8, 3), GemvConfig(4, 128, 1, 4, 3)):
        for n, k in ((7, 300), (40, 256)):
            w = torch.randn(n, k)
            x = torch.randn(1, 2 * k)
            torch.testing.assert_close(gemv(x[:, :k], w, config), gemv_reference(x[:, :k], w), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(gemv(x, w, config, gated=True), gemv(silu_and_mul(x), w, config))
            residual, added, weight = torch.randn(1, k), torch.empty(1, k), torch.rand(k) + 0.5
            got = gemv(x[:, :k], w, config, norm=Norm(weight, 1e-6, residual, added))
            normed, _ = rms_norm(x[:, :k], weight, 1e-6, residual.clone())
            torch.testing.assert_close(got, gemv_reference(normed, w), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(added, x[:, :k] + residual)


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_gated_gemv_equals_the_activation_then_the_gemv(config, dtype):
    """gated: x is [M, 2K] (gate, then up) and the kernel applies silu(gate) * up as it loads it,
    rounding as `silu_and_mul` does, so the result is the unfused pair's bit for bit (bf16: the
    rounding between the activation and the product counts; K 100: the masked tail; 256: whole
    tiles). x is a view into NaN: a load past its rows or columns would show."""
    from lanner.kernels.fused import silu_and_mul

    torch.manual_seed(0)
    for n, k in ((72, 256), (40, 100)):
        w = torch.randn(n, k, dtype=dtype)
        workspace = GemvWorkspace.of(config, n, 16, "cpu")
        for m in (1, 3):
            padded = torch.full((16, 2 * k + 64), float("nan"), dtype=dtype)
            padded[:m, :2 * k] = 3 * torch.randn(m, 2 * k)
            x = padded[:m, :2 * k]
            got = gemv(x, w, config, workspace, gated=True)
            assert torch.equal(got, gemv(silu_and_mul(x), w, config, workspace))
            if dtype == torch.float32 or m == 1:  # the interpreter's bf16 tl.dot is wrong (the GPU test has it)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(got, gemv_reference(x, w, gated=True), atol=tol * k ** 0.5, rtol=tol)
    with pytest.raises(AssertionError):
        gemv(torch.randn(1, k, dtype=dtype), w, config, workspace, gated=True)  # not gate and up


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_normed_gemv_equals_the_norm_then_the_gemv(config, dtype):
    """norm: the kernel adds the residual, multiplies by the norm's weight as it loads x, and scales
    by 1/RMS over all of K at the end (the sum of squares and the rounding otherwise than the norm
    kernel's: close, not bit for bit); x + residual goes to the norm's `added`, exactly, and the
    residual is left as it was. Without a residual (the first layer) x alone. x, the residual and
    `added` are views into NaN: a load or a store past their rows or columns would show."""
    from lanner.kernels.fused import rms_norm

    torch.manual_seed(0)
    for n, k in ((72, 256), (40, 100)):
        w = torch.randn(n, k, dtype=dtype)
        workspace = GemvWorkspace.of(config, n, 16, "cpu")
        weight = 1 + 0.1 * torch.randn(k, dtype=dtype)
        for m in (1, 3):
            x, residual, added = (torch.full((16, k + pad), float("nan"), dtype=dtype)[:m, :k] for pad in (64, 32, 48))
            padded_added = added._base
            x.copy_(torch.randn(m, k)), residual.copy_(torch.randn(m, k))
            start = residual.clone()
            for with_residual in (True, False):
                kernels = residual.clone()  # the add + RMSNorm kernel's
                normed = rms_norm(x, weight, 1e-6, kernels if with_residual else None)
                norm = Norm(weight, 1e-6, residual if with_residual else None, added if with_residual else None)
                got = gemv(x, w, config, workspace, norm=norm)
                assert torch.equal(residual, start) and not workspace.counters.any()
                if with_residual:
                    assert torch.equal(added, kernels)
                    assert padded_added[m:].isnan().all() and padded_added[:, k:].isnan().all()  # nothing past them
                    added.fill_(float("nan"))
                if dtype == torch.float32 or m == 1:  # the interpreter's bf16 tl.dot is wrong (the GPU test has it)
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    unfused = gemv(normed[0] if with_residual else normed, w, config, workspace)
                    torch.testing.assert_close(got, unfused, atol=tol * k ** 0.5, rtol=tol)
                if dtype == torch.float32:  # (the interpreter rounds to bf16 otherwise than torch)
                    reference = Norm.of(weight, 1e-6, x, residual.clone() if with_residual else None)
                    want = gemv_reference(x, w, norm=reference)
                    torch.testing.assert_close(got, want, atol=1e-4 * k ** 0.5, rtol=1e-4)
                    if with_residual:
                        assert torch.equal(reference.added, kernels)


def test_a_normed_gemv_of_one_row_holds_float16s_range():
    """One row multiplies h * weight in float32 before 1/RMS: a float16 residual channel of 2,000
    times a norm weight of 40 (80,000, past float16's 65,504) still gives the norm-then-GEMV result.
    Several rows would take h * weight in float16 on the tensor cores, so the GEMV refuses a normed
    float16 input of several rows (the GEMV table then runs the norm kernel first)."""
    from lanner.kernels.gemv import takes_norm

    torch.manual_seed(0)
    k, n = 64, 24
    x = torch.randn(1, k, dtype=torch.float16)
    residual = torch.randn(1, k, dtype=torch.float16)
    residual[0, 3] = 2000.0
    weight = torch.ones(k, dtype=torch.float16)
    weight[3] = 40.0
    w = (torch.randn(n, k) / k ** 0.5).to(torch.float16)
    config = GemvConfig(8, 64, 1, 4, 2)
    got = gemv(x, w, config, norm=Norm.of(weight, 1e-6, x, residual.clone()))
    want = gemv_reference(x, w, norm=Norm.of(weight, 1e-6, x, residual.clone()))
    assert got.isfinite().all()
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)
    assert takes_norm(torch.float16, 1) and takes_norm(torch.bfloat16, 8) and not takes_norm(torch.float16, 2)
    with pytest.raises(AssertionError):
        gemv(x.expand(3, k), w, config, norm=Norm.of(weight, 1e-6, x.expand(3, k), None))


def test_a_normed_gemv_writes_x_plus_residual_to_a_tensor_of_its_own():
    """`added` is written while other programs still read x and the residual: the GEMV refuses it
    missing, or being either of them."""
    x, residual, w = torch.randn(1, 64), torch.randn(1, 64), torch.randn(8, 64)
    for added in (None, residual, x):
        with pytest.raises(AssertionError):
            gemv(x, w, GemvConfig(8, 64, 1, 4, 2), norm=Norm(torch.ones(64), 1e-6, residual, added))


def test_gemv_writes_into_a_strided_output():
    w, x = torch.randn(24, 64), torch.randn(2, 64)
    buf = torch.zeros(2, 40)
    gemv(x, w, SMALL_CONFIGS[0], out=buf[:, :24])
    torch.testing.assert_close(buf[:, :24], gemv_reference(x, w), atol=1e-4, rtol=1e-4)
    assert not buf[:, 24:].any()


def spy_on_gemv(monkeypatch, kinds: list | None = None) -> list[int]:
    """The row count of each GEMV launched from here on, and into `kinds` its input's: "plain",
    "gated", "normed", or "first" (normed without a residual: the first layer's)."""
    calls = []

    def spy(x, weight, config, workspace=None, out=None, gated=False, norm=None):
        calls.append(x.shape[0])
        if kinds is not None:
            kinds.append("gated" if gated else "plain" if norm is None else "normed" if norm.residual is not None
                         else "first")
        return gemv(x, weight, config, workspace, out, gated, norm)

    monkeypatch.setattr(gemv_kernel, "gemv", spy)
    return calls


def give_gemv(layer, rows: list[int], config: GemvConfig = SMALL_CONFIGS[1], fused: bool = False) -> None:
    layer.gemv = dict.fromkeys(rows, config)
    layer.gemv_workspace = GemvWorkspace.of(config, layer.weight.shape[0], 16, "cpu")
    layer.fused_rows = frozenset(rows if fused else ())


def test_linear_runs_the_gemv_for_the_row_counts_it_was_given(monkeypatch):
    calls = spy_on_gemv(monkeypatch)
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True)
    layer.weight.normal_()
    layer.bias.normal_()
    give_gemv(layer, [1, 2])
    for m in (1, 2, 3):
        x = torch.randn(m, 64)
        want = x @ layer.weight.t() + layer.bias
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
        buf = torch.zeros(m, 40)  # a graph piece's static output buffer
        assert layer(x, out=buf) is buf
        torch.testing.assert_close(buf, want, atol=1e-4, rtol=1e-4)
    assert calls == [1, 1, 2, 2]  # 3 rows: no choice for them, torch's matmul


def test_lm_head_logits_run_the_gemv(monkeypatch):
    """The LM head, and a tied embedding's logits (the lookup itself stays an embedding)."""
    calls = spy_on_gemv(monkeypatch)
    torch.manual_seed(0)
    for head in (LMHead(64, 50), VocabEmbedding(50, 64)):
        head.weight.normal_()
        give_gemv(head, [1, 2])
        hidden = torch.randn(2, 64)
        torch.testing.assert_close(head.logits(hidden), hidden @ head.weight.t(), atol=1e-4, rtol=1e-4)
        logits = torch.empty(4, 50)
        head.logits(hidden, out=logits[:2])
        torch.testing.assert_close(logits[:2], hidden @ head.weight.t(), atol=1e-4, rtol=1e-4)
    ids = torch.tensor([3, 7])
    torch.testing.assert_close(head(ids), head.weight[ids])
    assert calls == [2, 2, 2, 2]


def test_gemv_kernels_option_is_checked():
    with pytest.raises(ConfigError, match="CUDA only"):
        LLM(device="cpu", gemv_kernels="triton")
    with pytest.raises(ConfigError, match="gemv_kernels"):
        LLM(device="cpu", gemv_kernels="fast")
    llm = LLM(device="cpu", gemv_kernels="auto")  # nothing to measure on the CPU
    assert llm.engine.runner.gemv_report is None
    assert not any(getattr(mod, "gemv", None) for mod in llm.engine.runner.model.modules())


def fake_times(winner: str, cublas: float, best: float):
    def measure(n, k, m, dtype, device, configs=None, kind="plain"):
        times = {str(c): best * 2 for c in candidates(m)}
        times["cublas"] = cublas
        times[winner] = best
        return times
    return measure


def test_the_table_key_changes_with_the_helpers_the_kernel_calls(monkeypatch):
    """A change to kernels/fused.py (silu_mul, add_rounded run inside the GEMV) or kernels/pdl.py
    must measure anew, as one to kernels/gemv.py does: their source is in the key's hash."""
    from pathlib import Path

    from lanner.kernels import fused, gemv, pdl

    before = gemv_table.kernel_hash()
    read = Path.read_bytes
    for module in (gemv, fused, pdl):
        changed = Path(module.__file__)
        with monkeypatch.context() as m:
            m.setattr(Path, "read_bytes", lambda self, c=changed: read(self) + (b"#" if self == c else b""))
            assert gemv_table.kernel_hash() != before, module.__name__
    assert gemv_table.kernel_hash() == before


def test_a_candidate_too_big_for_the_gpu_is_left_out_of_the_measurement(monkeypatch):
    """A launch that needs more shared memory than the GPU has (Triton raises as it launches, before
    the capture) leaves that timing out, and only that one: here the fused launches of one
    candidate, whose unfused launch (after the activation or norm kernel) still counts."""
    from triton.runtime.errors import OutOfResources

    too_big = candidates(1)[-2]

    def launch(x, w, config, workspace=None, out=None, **fused):
        if config == too_big and (fused or x.shape[1] != w.shape[1]):  # a norm, or a gated input
            raise OutOfResources(294912, 232448, "shared memory")
        return out

    def time_one_launch(run, views):
        run(views[0])
        return 1.0

    monkeypatch.setattr(gemv_kernel, "gemv", launch)
    monkeypatch.setattr(gemv_table, "graph_us", time_one_launch)
    names = {str(c) for c in candidates(1)}
    assert set(gemv_table.measure_shape(64, 128, 1, torch.float32, "cpu")) == {"cublas"} | names
    for kind in ("gated", "normed"):
        times = gemv_table.measure_shape(64, 128, 1, torch.float32, "cpu", kind=kind)
        assert set(times) == {"cublas"} | (names - {str(too_big)}) | {gemv_table.UNFUSED + c for c in names}, kind


def test_table_rules_and_persistence(tmp_path, monkeypatch):
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "test-gpu")
    one, rows = str(candidates(1)[2]), str(candidates(4)[1])
    path = tmp_path / "t.json"
    table = GemvTable("cpu", path)
    monkeypatch.setattr(gemv_table, "measure_shape", fake_times(one, cublas=10.0, best=8.0))
    assert str(table.choice(4096, 1024, 1, torch.bfloat16)) == one  # 20% faster: taken
    monkeypatch.setattr(gemv_table, "measure_shape", fake_times(rows, cublas=10.0, best=9.9))
    assert table.choice(4096, 1024, 3, torch.bfloat16) is None  # 1% faster: cuBLAS stays
    assert str(table.choice(4096, 1024, 4, torch.bfloat16, force=True)) == rows  # same bucket, forced
    assert table.measured == 2
    table.save()

    def never(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(gemv_table, "measure_shape", never)
    again = GemvTable("cpu", path)
    assert str(again.choice(4096, 1024, 1, torch.bfloat16)) == one
    assert again.choice(4096, 1024, 4, torch.bfloat16) is None
    assert again.measured == 0
    with pytest.raises(AssertionError, match="measured again"):  # another dtype is another entry
        again.choice(4096, 1024, 1, torch.float16)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"test-gpu": []}',
                                     '{"test-gpu": {"64x64/m1/float32": {"choice": "n8"}}}',
                                     '{"test-gpu": {"64x64/m1/float32": {"choice": "x", "us": {"cublas": 1}}}}'])
def test_a_corrupt_table_file_is_measured_again(tmp_path, monkeypatch, content):
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "test-gpu")
    path = tmp_path / "t.json"
    path.write_text(content)
    monkeypatch.setattr(gemv_table, "measure_shape", fake_times("cublas", cublas=1.0, best=1.0))
    table = GemvTable("cpu", path)
    assert table.choice(64, 64, 1, torch.float32) is None and table.measured == 1
    table.save()
    assert GemvTable("cpu", path).entries["64x64/m1/float32"]["choice"] == "cublas"


def test_no_memory_to_measure_means_cublas_for_this_run_only(tmp_path, monkeypatch):
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "test-gpu")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gemv_table, "measure_shape", out_of_memory)
    path = tmp_path / "t.json"
    table = GemvTable("cpu", path)
    assert table.choice(151936, 4096, 1, torch.bfloat16) is None
    monkeypatch.setattr(gemv_table, "measure_shape", fake_times("cublas", cublas=1.0, best=1.0))
    table.choice(64, 64, 1, torch.float32)
    table.save()
    assert set(GemvTable("cpu", path).entries) == {"64x64/m1/float32"}  # the failed one is measured next time


def test_row_buckets():
    assert [row_bucket(m) for m in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_assign_points_every_layer_at_its_choice_and_launches_each_kernel_once(tmp_path, monkeypatch):
    """The runner's path with the GPU's measurements stubbed: each (shape, row bucket) gets its
    winner, split-K layers share one workspace big enough for all, every chosen kernel is launched
    once before the layers are used (so none first launches inside a graph capture), and the layers
    then compute x @ w^T at every row count."""
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "test-gpu")
    split, plain = str(candidates(1)[-1]), str(candidates(2)[0])  # (16, 256, 8, ...) and (64, 128, 1, ...)
    assert "-s8-" in split and "-s1-" in plain

    def measure(n, k, m, dtype, device, configs=None, kind="plain"):
        return {"cublas": 10.0, split if m == 1 else plain: 5.0} if n != 24 else {"cublas": 1.0}

    monkeypatch.setattr(gemv_table, "measure_shape", measure)
    calls = spy_on_gemv(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(96, 40), Linear(40, 96), Linear(96, 24))
    for layer in model:
        layer.weight.normal_()
    report = gemv_table.assign_gemv_kernels([model], torch.float32, "cpu", table=GemvTable("cpu", tmp_path / "t.json"))
    assert report["measured"] == 3 * 4 and report["choices"]["40x96/m1"] == split
    assert report["choices"]["40x96/m8"] == plain and report["choices"]["24x96/m4"] == "cublas"
    assert set(model[0].gemv) == set(range(1, 9)) and not model[2].gemv
    assert model[0].gemv_workspace is model[1].gemv_workspace is model[2].gemv_workspace
    assert sorted(calls) == [1, 1, 2, 2]  # one launch per (shape, config, one row or several)
    for m in range(1, 9):
        x = torch.randn(m, 96)
        for layer in (model[0], model[2]):
            torch.testing.assert_close(layer(x), x @ layer.weight.t(), atol=1e-4, rtol=1e-4)
        y = torch.randn(m, 40)
        torch.testing.assert_close(model[1](y), y @ model[1].weight.t(), atol=1e-4, rtol=1e-4)


def test_a_gated_mlp_hands_gate_and_up_to_its_down_projections_gemv(monkeypatch):
    """Where its GEMV fuses (`fused_rows`), the down projection takes gate_up whole and applies the
    activation itself (no activation kernel between the two, one graph node fewer a layer); where
    the plain GEMV was measured faster, the activation runs, then it; elsewhere the activation then
    cuBLAS. Each way the MLP's output is the torch path's."""
    torch.manual_seed(0)
    mlp = GatedMLP(64, 48, bias=True)  # the bias after the GEMV, as without the gate
    for param in mlp.parameters():
        param.normal_(std=0.2)
    x = {m: torch.randn(m, 64) for m in (1, 2, 3, 4)}
    want = {m: mlp(x[m]) for m in x}
    give_gemv(mlp.down_proj, [1, 2], fused=True)
    mlp.down_proj.gemv[3] = SMALL_CONFIGS[1]  # not fused at 3 rows
    kinds = []
    calls = spy_on_gemv(monkeypatch, kinds)
    for m, rows in x.items():
        torch.testing.assert_close(mlp(rows), want[m], atol=1e-4, rtol=1e-4)
    assert calls == [1, 2, 3] and kinds == ["gated", "gated", "plain"]  # 4 rows: torch's matmul


def test_layers_are_measured_with_their_inputs_and_compiled_so(tmp_path, monkeypatch):
    """A gated MLP's down projection, and a projection after an RMSNorm, have table entries of their
    own, measured with their inputs as they run: the kernel before them then cuBLAS, that kernel then
    each configuration ("unfused ..."), and each configuration doing the work itself. Here the down
    projection fuses at one row, runs the activation then the plain GEMV at two, and cuBLAS above;
    a plain layer of its shape takes the GEMV at every row count. load_kernels compiles each choice
    once before any capture (a normed one twice: with a residual, and the first layer's without)."""
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "test-gpu")
    measured = []

    def measure(n, k, m, dtype, device, configs=None, kind="plain"):
        measured.append((n, k, m, kind))
        config = str(candidates(m)[0])
        if kind != "gated":
            return {"cublas": 10.0, config: 1.0} | ({f"unfused {config}": 2.0} if kind == "normed" else {})
        return {"cublas": 1.0 if m > 2 else 10.0, config: 1.0 if m == 1 else 20.0, f"unfused {config}": 2.0}

    monkeypatch.setattr(gemv_table, "measure_shape", measure)
    torch.manual_seed(0)
    model = torch.nn.Sequential(GatedMLP(64, 40), Linear(40, 64), Linear(64, 24))  # [1]: down_proj's shape, plain
    model[2].input_kind = "normed"
    for param in model.parameters():
        param.normal_(std=0.2)
    kinds = []
    calls = spy_on_gemv(monkeypatch, kinds)
    report = gemv_table.assign_gemv_kernels([model], torch.float32, "cpu", table=GemvTable("cpu", tmp_path / "t.json"))
    down, one, rows = model[0].down_proj, str(candidates(1)[0]), str(candidates(2)[0])
    assert {(64, 40, 2, "gated"), (64, 40, 2, "plain"), (80, 64, 2, "plain"), (24, 64, 2, "normed")} <= set(measured)
    assert report["choices"]["64x40/m1/gated"] == one and report["choices"]["64x40/m2/gated"] == f"unfused {rows}"
    assert report["choices"]["64x40/m4/gated"] == "cublas" and report["choices"]["64x40/m2"] == rows
    assert report["choices"]["24x64/m8/normed"] == rows
    assert set(down.gemv) == {1, 2} and down.fused_rows == {1} and set(model[1].gemv) == set(range(1, 9))
    assert not model[1].fused_rows and model[2].fused_rows == set(range(1, 9))
    launched = sorted(zip(calls, kinds))
    assert launched == sorted([(1, "plain"), (2, "plain")] * 2 + [(1, "gated"), (2, "plain")] +
                              [(1, "normed"), (1, "first"), (2, "normed"), (2, "first")])
    kinds.clear()
    for m in (1, 2, 4):
        x = torch.randn(m, 64)
        gate, up = (x @ model[0].gate_up_proj.weight.t()).chunk(2, dim=-1)
        want = (torch.nn.functional.silu(gate) * up) @ down.weight.t()
        torch.testing.assert_close(model[0](x), want, atol=1e-4, rtol=1e-4)
    # 1 row: gate_up, then the gated down; 2: gate_up, the plain down after the activation; 4: gate_up, cuBLAS
    assert kinds == ["plain", "gated", "plain", "plain", "plain"]


@pytest.fixture
def gemv_wins(monkeypatch, tmp_path) -> GemvTable:
    """A table in which the GEMV wins every shape, with wide row blocks (the interpreter runs
    programs one by one: few of them); a split-K configuration for several rows."""
    monkeypatch.setattr(gemv_table, "table_key", lambda device: "test-gpu")
    monkeypatch.setattr(gemv_table, "ONE_ROW_CANDIDATES", [(512, 512, 1, 4, 3)])
    monkeypatch.setattr(gemv_table, "ROWS_CANDIDATES", [(512, 128, 2, 4, 4)])
    monkeypatch.setattr(gemv_table, "measure_shape", lambda n, k, m, dtype, device, configs=None, kind="plain": {
        "cublas": 10.0, str(candidates(m)[0]): 1.0})
    return GemvTable("cpu", tmp_path / "t.json")


def test_the_engine_through_the_gemv_gives_the_torch_path_tokens(gemv_wins, monkeypatch):
    """Every linear and the tied LM head of the embedded model through the GEMV (the interpreter, in
    float32; a split-K configuration for several rows; the down projections gated, the projections
    after a norm applying it), decoding one request and two together: the same greedy tokens as
    torch's matmuls."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    batches = [["The capital of France is"], ["def fibonacci(n):", "Once upon a time"]]
    llm = LLM(num_kv_blocks=64)

    def run():
        return [[o.outputs[0].token_ids for o in llm.generate(b, params, use_tqdm=False)] for b in batches]

    want = run()
    report = gemv_table.assign_gemv_kernels(llm.engine.runner.networks(), torch.float32, "cpu", table=gemv_wins)
    assert "cublas" not in report["choices"].values()
    kinds = []
    calls = spy_on_gemv(monkeypatch, kinds)
    assert run() == want
    assert {1, 2} <= set(calls) and {"gated", "normed", "first", "plain"} <= set(kinds)


def test_graph_pieces_through_the_fused_gemv_give_the_torch_path_tokens(gemv_wins, monkeypatch):
    """Graph pieces of 4 and 8 tokens (the CPU runs them eagerly, padded, reading and writing only
    their static buffers) with every projection through the GEMV: a fused norm's x + residual is a
    tensor of its own, which the piece copies into its static residual for the next piece. The same
    greedy tokens as torch's matmuls through the same pieces."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm = LLM(num_kv_blocks=64, piecewise_graphs=True, piecewise_sizes=[4, 8])

    def run():  # a prompt alone (its prefill padded to 8 tokens), then two (decode steps padded to 4)
        return [[o.outputs[0].token_ids for o in llm.generate(b, params, use_tqdm=False)]
                for b in (["Once upon a time"], ["def fibonacci(n):", "Once upon a time"])]

    want = run()
    gemv_table.assign_gemv_kernels(llm.engine.runner.networks(), torch.float32, "cpu", table=gemv_wins)
    kinds = []
    calls = spy_on_gemv(monkeypatch, kinds)
    assert run() == want
    assert {4, 8} <= set(calls) and {"normed", "first"} <= set(kinds)


@pytest.mark.parametrize("method", ["draft_model", "eagle3", "mtp"])
def test_a_drafters_layers_run_the_gemv_too(gemv_wins, monkeypatch, heads, method):
    """The runner's networks include a drafter's: with the GEMV in every linear of both (the
    interpreter, float32; every projection after a norm and every down projection fused), speculative
    decoding gives the same tokens and accepts the same drafts (the drafts themselves are unchanged)
    as with torch's matmuls. EAGLE-3 reads the target's residual after the fused add (`aux_out`); the
    MTP layer normalizes its input without a residual."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(num_kv_blocks=64, speculative_config={"method": method, "num_speculative_tokens": 2,
                                                    "model": heads[method]})
    runner = llm.engine.runner
    assert runner.networks() == [runner.model, runner.drafter.net]

    def run():
        before = llm.engine.speculator.stats.as_dict()
        tokens = llm.generate(["def add(a, b):\n    return"], params, use_tqdm=False)[0].outputs[0].token_ids
        after = llm.engine.speculator.stats.as_dict()
        return tokens, after["spec_accepted_tokens"] - before["spec_accepted_tokens"]

    want = run()
    gemv_table.assign_gemv_kernels(runner.networks(), torch.float32, "cpu", table=gemv_wins)
    assert all(layer.gemv for layer in runner.drafter.net.modules() if isinstance(layer, Linear))
    kinds = []
    spy_on_gemv(monkeypatch, kinds)
    assert run() == want and (want[1] > 0 or method != "draft_model")  # random heads seldom agree
    assert {"plain", "gated", "normed", "first"} <= set(kinds)


def test_dependent_launch_needs_a_hopper_gpu():
    """--dependent-launch is refused on the CPU (it needs compute capability 9.0), and an engine on
    the CPU turns it off for the process (an engine on a GPU may have turned it on): the kernels'
    launches carry PDL=False and no launch_pdl."""
    from lanner.kernels import dependent_launch, set_dependent_launch

    with pytest.raises(ConfigError, match="dependent_launch"):
        LLM(device="cpu", dependent_launch=True)
    for choice in (False, None):
        set_dependent_launch(True)  # as a GPU engine before it
        LLM(device="cpu", dependent_launch=choice)
        assert dependent_launch() == {"PDL": False}
