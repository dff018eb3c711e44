"""Host-side integer helpers for the kernel launchers.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions (usable inside kernels); called
from Python they cost about 1.5 us each, and an eager Scatterbrain forward and backward make some
twenty such calls. These plain versions give the same results (tests/test_kernels.py checks).
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0
