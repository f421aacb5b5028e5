"""Triton kernels, each with a torch reference beside it. Nothing here imports Triton: the CPU
path uses this module."""
import operator

_dependent_launch = False


def set_dependent_launch(on: bool) -> None:
    """Programmatic dependent launch for the Triton kernels launched from now on (kernels/pdl.py):
    the model runner sets it for the process, on every device."""
    global _dependent_launch
    _dependent_launch = on


def dependent_launch() -> dict:
    """Launch arguments of a kernel with a `PDL` constexpr (kernels/pdl.py `wait_for_prior`)."""
    return {"PDL": True, "launch_pdl": True} if _dependent_launch else {"PDL": False}


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Launchers call this on the host each launch:
    `triton.next_power_of_2` is a ConstexprFunction in newer Triton, ~2 us a call."""
    n = operator.index(n)  # numpy and torch integers too
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
