"""Triton kernels for the chained low-rank attention backward (scatterattn/lora.py).

The chain needs two products with row-wise Kronecker factors (a (x) b)_n = vec(a_n b_n^T):
  * `kron_gram`:  M = sum_n (a_n (x) b_n) c_n^T     a (N, m), b (N, E), c (N, D) -> M (m, E, D)
  * `kron_rows`:  out_n = (a_n (x) b_n) . M          -> out (N, D)
Both build the (rows, chunk of m x E) Kronecker tile in registers from a and b and feed it to
`tl.dot`; the N x (m E) matrix never exists in memory. Per (batch, head) slice; fp32 accumulation.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _kron_tile(a_ptr, b_ptr, rows, n_ok, a0, M, E, stride_an, stride_bn,
               BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N, BLOCK_A * BLOCK_E) fp32 tile of a_n (x) b_n for features a0 .. a0 + BLOCK_A."""
    offs_a = a0 + tl.arange(0, BLOCK_A)
    offs_e = tl.arange(0, BLOCK_E)
    a = tl.load(a_ptr + rows[:, None] * stride_an + offs_a[None, :],
                mask=n_ok[:, None] & (offs_a[None, :] < M), other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_bn + offs_e[None, :],
                mask=n_ok[:, None] & (offs_e[None, :] < E), other=0.0).to(tl.float32)
    return tl.reshape(a[:, :, None] * b[:, None, :], (BLOCK_N, BLOCK_A * BLOCK_E))


@triton.jit
def kron_gram_kernel(A, B, C, OUT, N, M, E, D,
                     stride_ab, stride_an, stride_bb, stride_bn, stride_cb, stride_cn, stride_ob,
                     PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_a = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    a0 = pid_a * BLOCK_A
    offs_d = tl.arange(0, BLOCK_D)
    a_ptr = A + pid_bh * stride_ab
    b_ptr = B + pid_bh * stride_bb
    c_ptr = C + pid_bh * stride_cb
    acc = tl.zeros((BLOCK_A * BLOCK_E, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        n_ok = rows < N
        kron = _kron_tile(a_ptr, b_ptr, rows, n_ok, a0, M, E, stride_an, stride_bn, BLOCK_A, BLOCK_E, BLOCK_N)
        c = tl.load(c_ptr + rows[:, None] * stride_cn + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += tl.dot(tl.trans(kron).to(c.dtype), c, input_precision=PREC)
    # row r of acc is (feature a0 + r // BLOCK_E, column r % BLOCK_E)
    r = tl.arange(0, BLOCK_A * BLOCK_E)
    feat = a0 + r // BLOCK_E
    col = r % BLOCK_E
    ok = (feat < M) & (col < E)
    tl.store(OUT + pid_bh * stride_ob + (feat * E + col)[:, None] * D + offs_d[None, :], acc,
             mask=ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def kron_rows_kernel(A, B, MID, OUT, N, M, E, D,
                     stride_ab, stride_an, stride_bb, stride_bn, stride_mb, stride_ob, stride_on,
                     PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_A * BLOCK_E)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for a0 in range(0, M, BLOCK_A):
        kron = _kron_tile(A + pid_bh * stride_ab, B + pid_bh * stride_bb, rows, n_ok, a0, M, E,
                          stride_an, stride_bn, BLOCK_A, BLOCK_E, BLOCK_N)
        feat = a0 + r // BLOCK_E
        col = r % BLOCK_E
        ok = (feat < M) & (col < E)
        mid = tl.load(MID + pid_bh * stride_mb + (feat * E + col)[:, None] * D + offs_d[None, :],
                      mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += tl.dot(kron, mid, input_precision=PREC)
    tl.store(OUT + pid_bh * stride_ob + rows[:, None] * stride_on + offs_d[None, :], acc,
             mask=n_ok[:, None] & (offs_d[None, :] < D))


def _flat(x):
    """(..., N, F) -> contiguous (P, N, F) with P the product of the leading dims."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _blocks(m, e):
    block_e = max(1, triton.next_power_of_2(e))
    block_a = max(1, min(triton.next_power_of_2(m), max(1, 256 // block_e)))
    while block_a * block_e < 16:
        block_a *= 2
    return block_a, block_e


def kron_gram(a, b, c, *, block_n=32):
    """sum_n (a_n (x) b_n) c_n^T: a (..., N, m), b (..., N, E), c (..., N, D) -> (..., m, E, D) fp32."""
    lead = a.shape[:-2]
    n, m, e, d = a.shape[-2], a.shape[-1], b.shape[-1], c.shape[-1]
    a_, b_, c_ = _flat(a), _flat(b), _flat(c.to(torch.float32) if c.dtype == torch.float64 else c)
    out = torch.empty(a_.shape[0], m * e, d, device=a.device, dtype=torch.float32)
    block_a, block_e = _blocks(m, e)
    prec = "ieee" if c_.dtype == torch.float32 else "tf32"
    kron_gram_kernel[(math.ceil(m / block_a), a_.shape[0])](
        a_, b_, c_, out, n, m, e, d,
        a_.stride(0), a_.stride(1), b_.stride(0), b_.stride(1), c_.stride(0), c_.stride(1), out.stride(0),
        PREC=prec, BLOCK_N=block_n, BLOCK_A=block_a, BLOCK_E=block_e, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out.reshape(*lead, m, e, d)


def kron_rows(a, b, middle, *, block_n=32):
    """(a_n (x) b_n) . middle: a (..., N, m), b (..., N, E), middle (..., m, E, D) -> (..., N, D) fp32."""
    lead = a.shape[:-2]
    n, m, e, d = a.shape[-2], a.shape[-1], b.shape[-1], middle.shape[-1]
    a_, b_ = _flat(a), _flat(b)
    mid = middle.to(torch.float32).expand(*lead, m, e, d).reshape(-1, m * e, d).contiguous()
    out = torch.empty(a_.shape[0], n, d, device=a.device, dtype=torch.float32)
    block_a, block_e = _blocks(m, e)
    kron_rows_kernel[(math.ceil(n / block_n), a_.shape[0])](
        a_, b_, mid, out, n, m, e, d,
        a_.stride(0), a_.stride(1), b_.stride(0), b_.stride(1), mid.stride(0), out.stride(0), out.stride(1),
        PREC="ieee", BLOCK_N=block_n, BLOCK_A=block_a, BLOCK_E=block_e, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out.reshape(*lead, n, d)
