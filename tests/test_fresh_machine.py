"""A fresh machine has torch's CPU build and no Triton: the CPU path must not need it.
Each test runs a subprocess in which importing triton fails, as it does there."""
from __future__ import annotations

import subprocess
import sys
import textwrap

# None in sys.modules: `import triton` raises ImportError and find_spec("triton") is None
NO_TRITON = "import sys\nsys.modules['triton'] = None\n"


def run_without_triton(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TRITON + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_the_blocker_blocks():
    proc = run_without_triton("import triton")
    assert proc.returncode != 0 and "ModuleNotFoundError: import of triton halted" in proc.stderr


def test_cpu_path_completes_prompts_without_triton():
    proc = run_without_triton("""
        import contextlib, io, sys
        from lanner import LLM, SamplingParams
        from lanner.cli import main
        llm = LLM()
        greedy, sampled = llm.generate(["def add(a, b):", "import os"],
                                       [SamplingParams(max_tokens=8, temperature=0),
                                        SamplingParams(max_tokens=8, temperature=0.8, seed=1, top_p=0.9)])
        assert len(greedy.outputs[0].token_ids) == 8 and len(sampled.outputs[0].token_ids) == 8
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["generate", "def fibonacci(n):", "--max-tokens", "6"]) == 0
        assert len(out.getvalue().strip()) > len("def fibonacci(n):")
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit as e:
                assert e.code == 0
        import lanner.server.app  # what `lanner serve` loads
        assert not any(name == "triton" or name.startswith("triton.") for name in sys.modules
                       if sys.modules[name] is not None)
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_gpu_path_without_triton_names_the_package():
    proc = run_without_triton("""
        from lanner import LLM
        from lanner.errors import ConfigError
        try:
            LLM(attention_backend="triton")
        except ConfigError as e:
            print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout and "pip install triton" in proc.stdout
