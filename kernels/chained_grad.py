"""Triton kernels for the chained low-rank attention backward (scatterattn/lora.py).

The chain needs two products with row-wise Kronecker factors (a (x) b)_n = vec(a_n b_n^T):
  * `kron_gram`:  M[f, e, :] = sum_n a[n, f] b[n, e] c[n, :]    a (N, m), b (N, E), c (N, D) -> (m, E, D)
  * `kron_rows`:  out[n, :]  = sum_{f, e} a[n, f] b[n, e] M[f, e, :]                          -> (N, D)
Both run the feature index f (m of them, the long one) through the tensor cores and the column e
of b as a loop with an elementwise weight, so the only non-tensor-core work is 1/(2 m) of the flops:
  gram: for each e, M[:, e, :] = a^T (b[:, e] * c)        (contraction over rows n)
  rows: out = sum_e b[:, e] * (a M[:, e, :])               (contraction over features f)
The N x (m E) Kronecker matrix never exists, not even as a tile. Per (batch, head) slice.

Precision: the dot operands (a, c, M) are cast to `operand_dtype` -- bf16 for half-precision
inputs on CUDA (as FlashAttention casts P and dS for its backward matmuls; bf16 rather than fp16
because a = D~^-1 phi(q) reaches 1e-7 and below) and in the CPU interpreter when its bf16 dots
and casts are right (`interpreter.bf16_kernels_work`), fp32 otherwise -- with fp32 accumulation;
the weights b stay fp32. fp32 operands use TF32 tensor cores only when torch allows TF32 matmuls
(`torch.backends.cuda.matmul.allow_tf32`), IEEE fp32 otherwise. Outputs are fp32.
"""

import math

import torch
import triton
import triton.language as tl

from .host import launch_device, next_power_of_2


@triton.jit
def kron_gram_kernel(A, BT, C, OUT, N, M, E, D, ROWS_PER_SPLIT, N_SPLITS,
                     stride_ap, stride_an, stride_bp, stride_be, stride_cp, stride_cn, stride_op,
                     PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Program (e, feature block, slice x row split): the partial OUT[f, e, :] of its split's rows,
    for f in the feature block (splits are summed by the launcher)."""
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_ps = tl.program_id(2).to(tl.int64)
    pid_p = pid_ps // N_SPLITS
    start = (pid_ps % N_SPLITS) * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, N)
    offs_f = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    a_ptr = A + pid_p * stride_ap
    b_ptr = BT + pid_p * stride_bp + e * stride_be
    c_ptr = C + pid_p * stride_cp
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        n_ok = rows < end
        a_t = tl.load(a_ptr + offs_f[:, None] + rows[None, :] * stride_an,
                      mask=(offs_f[:, None] < M) & n_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        b_col = tl.load(b_ptr + rows, mask=n_ok, other=0.0)
        c = tl.load(c_ptr + rows[:, None] * stride_cn + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = tl.dot(a_t, (c * b_col[:, None]).to(a_t.dtype), acc, input_precision=PREC)
    tl.store(OUT + pid_ps * stride_op + (offs_f[:, None] * E + e) * D + offs_d[None, :], acc,
             mask=(offs_f[:, None] < M) & (offs_d[None, :] < D))


@triton.jit
def kron_rows_kernel(A, BT, MID, OUT, N, M, E, D, MID_GROUP,
                     stride_ap, stride_an, stride_bp, stride_be, stride_mp, stride_op, stride_on,
                     PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Program (row block, slice): OUT[n, :] for the block's rows; slice p reads middle p // MID_GROUP."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    a_ptr = A + pid_p * stride_ap
    b_ptr = BT + pid_p * stride_bp
    mid_ptr = MID + (pid_p // MID_GROUP) * stride_mp
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for f0 in range(0, M, BLOCK_M):
        offs_f = f0 + tl.arange(0, BLOCK_M)
        a = tl.load(a_ptr + rows[:, None] * stride_an + offs_f[None, :],
                    mask=n_ok[:, None] & (offs_f[None, :] < M), other=0.0)  # (BLOCK_N, BLOCK_M)
        mid_ptrs = mid_ptr + offs_f[:, None] * (E * D) + offs_d[None, :]
        mid_ok = (offs_f[:, None] < M) & (offs_d[None, :] < D)
        for e in range(0, E):
            b_col = tl.load(b_ptr + e * stride_be + rows, mask=n_ok, other=0.0)
            mid = tl.load(mid_ptrs + e * D, mask=mid_ok, other=0.0)
            acc += b_col[:, None] * tl.dot(a, mid, input_precision=PREC)
    tl.store(OUT + pid_p * stride_op + rows[:, None] * stride_on + offs_d[None, :], acc,
             mask=n_ok[:, None] & (offs_d[None, :] < D))


MAX_DIM = 256  # D and E of the launchers (one BLOCK_D covers D)


def operand_dtype(dtype: torch.dtype, device: torch.device | str = "cuda") -> torch.dtype:
    """The dot-operand dtype for inputs of `dtype` on `device` (see the module docstring)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    from .interpreter import bf16_kernels_work

    return torch.bfloat16 if bf16_kernels_work() else torch.float32


def _precision(op_dtype: torch.dtype) -> str:
    if op_dtype != torch.float32:
        return "ieee"  # unused for 16-bit operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _flat(x, dtype):
    """(..., N, F) -> (P, N, F) of `dtype` with unit stride along F (a view when it already is),
    P the product of the leading dims; the kernels take the P and N strides."""
    flat = x.reshape(-1, x.shape[-2], x.shape[-1]).to(dtype)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _weights_by_column(b):
    """(..., N, E) -> contiguous fp32 (P, E, N): each column of b contiguous."""
    return b.reshape(-1, b.shape[-2], b.shape[-1]).transpose(1, 2).to(torch.float32).contiguous()


def _middle_slices(middle, lead, op_dtype):
    """middle (..., m, E, D) broadcast over a's leading dims `lead` -> (contiguous (P', m E, D) of
    op_dtype, group) such that a-slice p uses middle slice p // group. Trailing broadcast dims (the
    query group of GQA) are not copied; any other broadcast is expanded."""
    m, e, d = middle.shape[-3:]
    mid_lead = (1,) * (len(lead) - (middle.dim() - 3)) + tuple(middle.shape[:-3])
    k = len(lead)
    while k > 0 and mid_lead[k - 1] == 1 and lead[k - 1] != 1:
        k -= 1
    if mid_lead[:k] == tuple(lead[:k]) and all(x == 1 for x in mid_lead[k:]):
        return middle.reshape(-1, m * e, d).to(op_dtype).contiguous(), math.prod(lead[k:])
    return middle.expand(*lead, m, e, d).reshape(-1, m * e, d).to(op_dtype).contiguous(), 1


def _block(size: int, cap: int) -> int:
    return max(16, min(next_power_of_2(size), cap))


def _check_dims(name: str, **dims) -> None:
    for label, size in dims.items():
        if size > MAX_DIM:
            raise ValueError(f"{name}: {label} must be <= {MAX_DIM} (one block covers it), got {size}")


def launch_config(kind: str, op_dtype: torch.dtype, m: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) of `kron_gram` / `kron_rows` (kind 'gram' or 'rows') for m
    features and head dim d (the larger of D and E).

    Chosen without a GPU from registers, spills and shared memory compiled for sm_90
    (bench/kernel_resources.py): every default below is spill-free and within 227 KiB of shared
    memory under triton 3.6 and 3.9 at d = 64, 128 and 256. Wider heads take fewer features per dot;
    fp32 operands (TF32, and above all IEEE FMA dots) hold more registers per element.
    """
    wide = 0 if d <= 64 else (1 if d <= 128 else 2)
    if op_dtype != torch.float32:
        if kind == "gram":
            return 64, _block(m, (256, 128, 128)[wide]), 8
        return 64, _block(m, (256, 128, 64)[wide]), (4, 4, 8)[wide]
    if _precision(op_dtype) == "tf32":
        return (64, 32, 32)[wide], _block(m, (128, 128, 64)[wide]), 8
    if kind == "gram":
        return (32, 32, 16)[wide], _block(m, (64, 32, 32)[wide]), 8
    return 32, _block(m, 64), 8


def _row_splits(n: int, programs: int, block_n: int, device) -> int:
    """Row splits of kron_gram: enough programs for two waves over the GPU's SMs when the
    (E x feature blocks x slices) grid is small, each split keeping at least 8 row blocks."""
    if torch.device(device).type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = math.ceil(2 * sms / programs)
    return max(1, min(wanted, n // (8 * block_n)))


def kron_gram(a, b, c, *, op_dtype=torch.float32, block_n=None, block_m=None, num_warps=None, num_stages=None,
              splits=None):
    """sum_n (a_n (x) b_n) c_n^T: a (..., N, m), b (..., N, E), c (..., N, D) -> (..., m, E, D) fp32.

    Grid (E, feature blocks, slices x row splits); each program streams its split's rows, so its
    accumulator is one (BLOCK_M, D) block of the output; splits (default `_row_splits`: only when
    the grid would not fill the GPU) are summed here. op_dtype: dtype of the dot operands a, b * c."""
    lead = a.shape[:-2]
    n, m, e, d = a.shape[-2], a.shape[-1], b.shape[-1], c.shape[-1]
    _check_dims("kron_gram", **{"b.shape[-1]": e, "c.shape[-1]": d})
    if not a.shape[:-1] == b.shape[:-1] == c.shape[:-1] or n == 0:
        raise ValueError(f"kron_gram: a, b, c must share their leading dims and N >= 1, got "
                         f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(c.shape)}")
    a_, c_, bt = _flat(a, op_dtype), _flat(c, op_dtype), _weights_by_column(b)
    default = launch_config("gram", op_dtype, m, max(d, e))
    block_n, block_m, num_warps = (given or fallback for given, fallback in zip((block_n, block_m, num_warps), default))
    block_d = _block(d, MAX_DIM)
    slices, m_blocks = a_.shape[0], math.ceil(m / block_m)
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"kron_gram: splits must be an int >= 1 or None, got {splits!r}")
    splits = splits or _row_splits(n, e * m_blocks * slices, block_n, a.device)
    rows_per_split = math.ceil(math.ceil(n / splits) / block_n) * block_n
    splits = max(1, math.ceil(n / rows_per_split))
    out = torch.empty(slices * splits, m * e, d, device=a.device, dtype=torch.float32)
    with launch_device(a):
        kron_gram_kernel[(e, m_blocks, slices * splits)](
            a_, bt, c_, out, n, m, e, d, rows_per_split, splits,
            a_.stride(0), a_.stride(1), bt.stride(0), bt.stride(1), c_.stride(0), c_.stride(1), out.stride(0),
            PREC=_precision(op_dtype), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
            **({} if num_stages is None else {"num_stages": num_stages}),
        )
    if splits > 1:
        out = out.reshape(slices, splits, m * e, d).sum(1)
    return out.reshape(*lead, m, e, d)


def kron_rows(a, b, middle, *, op_dtype=torch.float32, block_n=None, block_m=None, num_warps=None, num_stages=None):
    """(a_n (x) b_n) . middle: a (..., N, m), b (..., N, E), middle (..., m, E, D) -> (..., N, D) fp32.

    middle broadcasts over a's leading dims. Grid (row blocks, slices); each program keeps its
    (BLOCK_N, BLOCK_M) block of a and loops over the E columns of b. op_dtype: dtype of a and middle."""
    lead = a.shape[:-2]
    n, m, e, d = a.shape[-2], a.shape[-1], b.shape[-1], middle.shape[-1]
    _check_dims("kron_rows", **{"b.shape[-1]": e, "middle.shape[-1]": d})
    if a.shape[:-1] != b.shape[:-1] or tuple(middle.shape[-3:-1]) != (m, e) or n == 0:
        raise ValueError(f"kron_rows: a (..., N, m) and b (..., N, E) must share their leading dims, N >= 1, "
                         f"and middle end in (m, E, D); got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(middle.shape)}")
    a_, bt = _flat(a, op_dtype), _weights_by_column(b)
    mid, mid_group = _middle_slices(middle, lead, op_dtype)
    out = torch.empty(a_.shape[0], n, d, device=a.device, dtype=torch.float32)
    default = launch_config("rows", op_dtype, m, max(d, e))
    block_n, block_m, num_warps = (given or fallback for given, fallback in zip((block_n, block_m, num_warps), default))
    block_d = _block(d, MAX_DIM)
    with launch_device(a):
        kron_rows_kernel[(math.ceil(n / block_n), a_.shape[0])](
            a_, bt, mid, out, n, m, e, d, mid_group,
            a_.stride(0), a_.stride(1), bt.stride(0), bt.stride(1), mid.stride(0), out.stride(0), out.stride(1),
            PREC=_precision(op_dtype), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
            **({} if num_stages is None else {"num_stages": num_stages}),
        )
    return out.reshape(*lead, n, d)
