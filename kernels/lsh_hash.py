"""Triton kernels for the hashing pass of LSH supports (scatterattn/sparsity.py: `lsh_plan`, whose
torch version, `xbox_hashes`, is their reference).

Two launches give the sort keys of every round for q and k, where torch takes some fifteen small
ops (each a kernel launch):
  * norms_projections_kernel: for every row x of q and of k, in fp32 from x in its own dtype, the
    squared norm |x|^2 and the projections x . a_r onto the R hash directions (one read of x), and
    per (batch, key/value head) the largest |q|^2 over its query group and |k|^2 over its real keys
    (atomic max on the fp32 bits: non-negative floats order as their bit patterns).
  * xbox_hash_kernel: the XBOX+ hash of each row in each round, with M^2 = max|q|^2 + max|k|^2,
        q: q . a_r + sqrt(M^2 - |q|^2) a_r[D + 1],     k: k . a_r + sqrt(M^2 - |k|^2) a_r[D],
    +inf for padded keys, written in (slice, round, position) order, ready for a sort along the
    sequence, into one buffer (the kernel writes a single tensor): q's then k's, or with N = S
    (B, H + Hkv, R, N), so that one sort orders both.
Equal to the torch version up to fp32 summation order and fused multiply-adds (1e-6 relative).
"""

import torch
import triton
import triton.language as tl

from .host import cdiv, launch_device, next_power_of_2


@triton.jit
def norms_projections_kernel(Q, K, DIRS, SQ, PROJ, SQ_MAX, VALID, N, S, D, R, HEADS, GROUP, KV_HEADS,
                             stride_qp, stride_qn, stride_kp, stride_kn, stride_dr, stride_valid_b, L,
                             HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, slice): slices [0, B*H) are q's, [B*H, B*H + B*Hkv) k's.
    SQ[p, n] = |x_n|^2, PROJ[p, n, r] = x_n . a_r (fp32, rows of length L = max(N, S));
    SQ_MAX[0, slot] (q) and SQ_MAX[1, slot] (k): int32 bits of the max |x|^2, slot = b*Hkv + kv head,
    over real rows (padded keys count 0)."""
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    q_slices = (tl.num_programs(1) // (HEADS + KV_HEADS)) * HEADS
    is_key = p >= q_slices
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.where(is_key, p - q_slices, p // GROUP)  # b * Hkv + key/value head
    in_range = rows < tl.where(is_key, S, N)
    if is_key:  # (only pointers are chosen by branch: scalars may be specialised to constexprs)
        x_ptr = K + slot.to(tl.int64) * stride_kp + rows[:, None] * stride_kn
    else:
        x_ptr = Q + p.to(tl.int64) * stride_qp + rows[:, None] * stride_qn
    x = tl.load(x_ptr + offs_d[None, :], mask=in_range[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    sq = tl.sum(x * x, 1)
    out_rows = p.to(tl.int64) * L + rows
    tl.store(SQ + out_rows, sq, mask=in_range)
    for r in range(R):
        a = tl.load(DIRS + r * stride_dr + offs_d, mask=offs_d < D, other=0.0)
        tl.store(PROJ + out_rows * R + r, tl.sum(x * a[None, :], 1), mask=in_range)
    real = in_range
    if HAS_VALID:
        batch = slot // KV_HEADS
        valid = tl.load(VALID + batch * stride_valid_b + rows, mask=rows < S, other=1)
        real = in_range & ((valid != 0) | (p < q_slices))  # (q slices: unused)
    largest = tl.max(tl.where(real, sq, 0.0), 0)
    tl.atomic_max(SQ_MAX + is_key.to(tl.int32) * (tl.num_programs(1) // (HEADS + KV_HEADS)) * KV_HEADS + slot,
                  largest.to(tl.int32, bitcast=True))


@triton.jit
def xbox_hash_kernel(SQ, PROJ, SQ_MAX, DIRS, VALID, HASH, N, S, D, R, HEADS, GROUP, KV_HEADS,
                     stride_dr, stride_valid_b, L, stride_qhb, stride_qhh, stride_qhr, k_hash_offset, stride_khb,
                     stride_khh, stride_khr, HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, slice), slices as above: q_hash[b, h, r, n] at HASH + b stride_qhb + h stride_qhh
    + r stride_qhr + n, k_hash[b, j, r, s] at HASH + k_hash_offset + the same with k's strides (fp32;
    one buffer, so that the kernel writes a single tensor)."""
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    batches = tl.num_programs(1) // (HEADS + KV_HEADS)
    q_slices = batches * HEADS
    is_key = p >= q_slices
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.where(is_key, p - q_slices, p // GROUP)
    batch = slot // KV_HEADS
    in_range = rows < tl.where(is_key, S, N)
    stride_hr = tl.where(is_key, stride_khr, stride_qhr)
    ext_col = tl.where(is_key, D, D + 1)  # k' = [k, sqrt(M^2 - |k|^2), 0], q' = [q, 0, sqrt(M^2 - |q|^2)]
    k_start = k_hash_offset + batch.to(tl.int64) * stride_khb + (slot % KV_HEADS) * stride_khh
    q_start = batch.to(tl.int64) * stride_qhb + (p % HEADS) * stride_qhh
    hash_ptr = HASH + tl.where(is_key, k_start, q_start) + rows
    m_sq = (tl.load(SQ_MAX + slot).to(tl.float32, bitcast=True)
            + tl.load(SQ_MAX + batches * KV_HEADS + slot).to(tl.float32, bitcast=True))
    out_rows = p.to(tl.int64) * L + rows
    sq = tl.load(SQ + out_rows, mask=in_range, other=0.0)
    ext = tl.sqrt_rn(tl.maximum(m_sq - sq, 0.0))
    padded = rows < 0
    if HAS_VALID:
        valid = tl.load(VALID + batch * stride_valid_b + rows, mask=rows < S, other=1)
        padded = (valid == 0) & (p >= q_slices)
    for r in range(R):
        a_ext = tl.load(DIRS + r * stride_dr + ext_col)
        h = tl.load(PROJ + out_rows * R + r, mask=in_range, other=0.0) + ext * a_ext
        tl.store(hash_ptr + r * stride_hr, tl.where(padded, float("inf"), h), mask=in_range)


def xbox_hashes(query: torch.Tensor, key: torch.Tensor, directions: torch.Tensor, key_valid=None, *,
                block_n: int = 64):
    """query (B, H, N, D), key (B, Hkv, S, D) in fp16/bf16/fp32, directions (R, D + 2) fp32, key_valid
    (B, S) bool or None -> (q_hash (B, H, R, N), k_hash (B, Hkv, R, S), joint), fp32 sort keys of
    `scatterattn.sparsity.xbox_hashes`. joint: with N = S the (B, H + Hkv, R, N) buffer whose head
    slices [:H] and [H:] are q_hash and k_hash (one sort orders both), else None."""
    batch, heads, n_q, dim = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    n_rounds, length = directions.shape[0], max(n_q, n_k)
    device = query.device
    q = query.reshape(batch * heads, n_q, dim)
    k = key.reshape(batch * kv_heads, n_k, dim)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    dirs = directions.to(device=device, dtype=torch.float32).contiguous()
    slices = batch * (heads + kv_heads)
    sq = torch.empty(slices, length, device=device, dtype=torch.float32)
    proj = torch.empty(slices, length, n_rounds, device=device, dtype=torch.float32)
    sq_max = torch.zeros(2, batch * kv_heads, device=device, dtype=torch.int32)
    valid = key_valid.contiguous() if key_valid is not None else sq_max  # (bool or int8: Triton loads *i1 as bytes)
    valid_stride = valid.stride(0) if key_valid is not None else 0
    if n_q == n_k:
        joint = hashes = torch.empty(batch, heads + kv_heads, n_rounds, n_q, device=device, dtype=torch.float32)
        q_hash, k_hash = joint[:, :heads], joint[:, heads:]
    else:  # q's hashes, then k's, in one flat buffer
        joint, q_size = None, batch * heads * n_rounds * n_q
        hashes = torch.empty(q_size + batch * kv_heads * n_rounds * n_k, device=device, dtype=torch.float32)
        q_hash = hashes[:q_size].view(batch, heads, n_rounds, n_q)
        k_hash = hashes[q_size:].view(batch, kv_heads, n_rounds, n_k)
    block_d = max(16, next_power_of_2(dim))
    grid = (cdiv(length, block_n), slices)
    sizes = (n_q, n_k, dim, n_rounds, heads, heads // kv_heads, kv_heads)
    with launch_device(query):
        norms_projections_kernel[grid](
            q, k, dirs, sq, proj, sq_max, valid, *sizes, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            dirs.stride(0), valid_stride, length,
            HAS_VALID=key_valid is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
        )
        xbox_hash_kernel[grid](
            sq, proj, sq_max, dirs, valid, hashes, *sizes, dirs.stride(0), valid_stride, length,
            *q_hash.stride()[:3], k_hash.storage_offset(), *k_hash.stride()[:3],
            HAS_VALID=key_valid is not None, BLOCK_N=block_n,
        )
    return q_hash, k_hash, joint
