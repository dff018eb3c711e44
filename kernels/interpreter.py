"""What the Triton interpreter (TRITON_INTERPRET=1, the CPU path of the kernels) gets right.

The interpreter stores bf16 tensors as uint16, and its `tl.dot` multiplies those bit patterns
(triton-lang/triton#11584; upstream does not support bf16 dots in the interpreter), so a bf16 dot
returns values near 1e10. `bf16_dot_works` finds out by running one 16 x 16 dot whose exact answer
is known, so a Triton that fixes it (or a test harness that widens bf16 operands) is taken as is.
"""

import functools

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


@functools.cache
def bf16_dot_works() -> bool:
    """Whether a bf16 `tl.dot` on CPU tensors (the interpreter) equals the exact product. Small
    integers make every product and sum exact in bf16 inputs with fp32 accumulation."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-2, 3, (PROBE, PROBE), generator=gen).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(PROBE, PROBE, dtype=torch.float32)
    bf16_dot_probe_kernel[(1,)](a, b, c, BLOCK=PROBE)
    return torch.equal(c, a.float() @ b.float())
