"""Triton kernel for the hashing pass of LSH supports (scatterattn/sparsity.py, `lsh_plan`).

For every row x of q or k it computes, in fp32 from x in its own dtype, the squared norm |x|^2 and
the projections x . a_r onto the R hash directions: one read of x, where the torch version makes
an fp32 copy of q and k and reads it three times. The XBOX+ extension, the sorts and the bucket
bookkeeping stay in torch (`lsh_plan`); only this O(N D) pass is fused.
Equal to the torch version up to fp32 summation order (1e-6 relative).
"""

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit
def norms_and_projections_kernel(X, PROJ, SQ, HASH, N, D, R, stride_xp, stride_xn, stride_pr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, slice): SQ[p, n] = |x_n|^2, HASH[p, n, r] = x_n . a_r (fp32)."""
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = rows < N
    x = tl.load(X + pid_p * stride_xp + rows[:, None] * stride_xn + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    tl.store(SQ + pid_p * N + rows, tl.sum(x * x, 1), mask=n_ok)
    for r in range(R):
        a = tl.load(PROJ + r * stride_pr + offs_d, mask=offs_d < D, other=0.0)
        tl.store(HASH + (pid_p * N + rows) * R + r, tl.sum(x * a[None, :], 1), mask=n_ok)


def norms_and_projections(x: torch.Tensor, directions: torch.Tensor, *, block_n: int = 64):
    """x (..., N, D) fp16/bf16/fp32, directions (R, D) -> (|x|^2 (..., N), x . a (..., N, R)), fp32."""
    lead, (n, d), r = x.shape[:-2], x.shape[-2:], directions.shape[0]
    flat = x.reshape(-1, n, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    proj = directions.to(device=x.device, dtype=torch.float32).contiguous()
    sq = torch.empty(flat.shape[0], n, device=x.device, dtype=torch.float32)
    hashes = torch.empty(flat.shape[0], n, r, device=x.device, dtype=torch.float32)
    block_d = max(16, next_power_of_2(d))
    norms_and_projections_kernel[(cdiv(n, block_n), flat.shape[0])](
        flat, proj, sq, hashes, n, d, r, flat.stride(0), flat.stride(1), proj.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
    )
    return sq.reshape(*lead, n), hashes.reshape(*lead, n, r)
