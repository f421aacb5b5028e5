import sys

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/gpu/", 1)[0])  # the CPU tests' helpers (kernel_cases, conftest)

if not torch.cuda.is_available():
    raise pytest.UsageError("tests/gpu needs a CUDA GPU; run it on the GPU machine")


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Engines of earlier tests must not count against the next one's memory budget."""
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()
