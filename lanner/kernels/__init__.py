"""Triton kernels, each with a torch reference beside it."""
import operator


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Launchers call this on the host each launch:
    `triton.next_power_of_2` is a ConstexprFunction in newer Triton, ~2 us a call."""
    n = operator.index(n)  # numpy and torch integers too
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
