"""What the Triton interpreter (TRITON_INTERPRET=1, the CPU path of the kernels) gets right.

The interpreter stores bf16 tensors as uint16, and its `tl.dot` multiplies those bit patterns
(triton-lang/triton#11584; upstream does not support bf16 dots in the interpreter), so a bf16 dot
returns values near 1e10. `bf16_dot_works` finds out by running one 16 x 16 dot whose exact answer
is known, so a Triton that fixes it (or a test harness that widens bf16 operands) is taken as is.
Its fp32 -> bf16 casts truncate where a GPU rounds to nearest even (interpreter downcasts:
triton-lang/triton#8322): a bias of -2^-9 relative on average, which the Scatterbrain kernels'
near-cancelling sums turn into errors of 0.1-0.4 where the support holds most of the low-rank mass.
`bf16_casts_round` finds out from one cast.
"""

import os

import torch
import triton
import triton.language as tl

PROBE = 16  # the smallest tl.dot shape


@triton.jit
def bf16_dot_probe_kernel(A, B, C, BLOCK: tl.constexpr):
    """C = A @ B for (BLOCK, BLOCK) row-major bf16 A, B and fp32 C."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    tl.store(C + tile, tl.dot(tl.load(A + tile), tl.load(B + tile)))


_VERDICTS: dict[str, bool] = {}  # each probe runs once per process (until `clear_probes`)


def clear_probes() -> None:
    """Forget the probes' verdicts (for tests that change the interpreter)."""
    _VERDICTS.clear()


@torch.compiler.assume_constant_result  # (run eagerly, not traced, when torch.compile traces a caller)
def bf16_dot_works() -> bool:
    """Whether a bf16 `tl.dot` on CPU tensors (the interpreter) equals the exact product. Small
    integers make every product and sum exact in bf16 inputs with fp32 accumulation."""
    if "dot" not in _VERDICTS:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randint(-2, 3, (PROBE, PROBE), generator=gen).to(torch.bfloat16) for _ in range(2))
        c = torch.empty(PROBE, PROBE, dtype=torch.float32)
        bf16_dot_probe_kernel[(1,)](a, b, c, BLOCK=PROBE)
        _VERDICTS["dot"] = torch.equal(c, a.float() @ b.float())
    return _VERDICTS["dot"]


@triton.jit
def bf16_cast_probe_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))


@torch.compiler.assume_constant_result
def bf16_casts_round() -> bool:
    """Whether fp32 -> bf16 casts on CPU tensors (the interpreter) round to nearest even, as a GPU's
    do: 1 + 0.75 * 2^-7 lies between the bf16 neighbours 1 and 1 + 2^-7 and rounds up (truncation
    gives 1); 1 + 0.5 * 2^-7 is a tie and rounds to even (1)."""
    if "cast" not in _VERDICTS:
        x = torch.tensor([1 + 0.75 * 2**-7, -(1 + 0.75 * 2**-7), 1 + 0.5 * 2**-7, 1 + 1.5 * 2**-7] + [0.0] * 12)
        y = torch.empty(PROBE, dtype=torch.bfloat16)
        bf16_cast_probe_kernel[(1,)](x, y, BLOCK=PROBE)
        _VERDICTS["cast"] = torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    return _VERDICTS["cast"]


def bf16_kernels_work() -> bool:
    """Whether bf16 kernels give a GPU's results on CPU tensors: right dots and rounded casts. False
    without the interpreter (TRITON_INTERPRET unset, e.g. on a GPU machine): no kernel runs on CPU
    tensors then, and the probes would be compiled for the GPU and fail on CPU pointers."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    return bf16_dot_works() and bf16_casts_round()
