"""Triton helpers shared by the Scatterbrain forward and backward kernels."""

import triton
import triton.language as tl

NEG_VALUE = -1.0e30  # "minus infinity" that keeps exp(NEG - NEG) finite
NEG = tl.constexpr(NEG_VALUE)  # kernels may only read constexpr globals


@triton.jit
def feature_logits(x, x_sq_half, W, f0, M, D, stride_wm, sqrt_tau,
                    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """(rows, BLOCK_F) fp32: w_f . x~ - |x~|^2/2 for features f0 .. f0 + BLOCK_F; NEG past M."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                mask=(offs_f[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    logits = tl.dot(x, tl.trans(w), input_precision=PREC) * sqrt_tau - x_sq_half[:, None]
    return tl.where(offs_f[None, :] < M, logits, NEG)


@triton.jit
def load_key_chunk(K_LIST, k0, TK, S, VALID_ROW, k_base, v_base, stride_kn, stride_vn, D, DV,
                   HAS_VALID: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """Keys k0 .. k0 + BLOCK_K of a tile's key list: positions kj (S = empty), k_ok, k, v."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kj = tl.load(K_LIST + offs_k, mask=offs_k < TK, other=S)
    k_ok = kj < S
    if HAS_VALID:
        k_ok = k_ok & (tl.load(VALID_ROW + kj, mask=k_ok, other=0) != 0)
    k = tl.load(k_base + kj[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + kj[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],
                mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    return kj, k_ok, k, v


@triton.jit
def support_mask(qi, q_ok, kj, k_ok, Q_BUCKET_ROW, K_BUCKET_ROW, stride_qbr, stride_kbr, ROUND, BAND,
                 HAS_BAND: tl.constexpr, DEDUP: tl.constexpr):
    """(rows, keys) bool: real pairs inside the band, not already owned by an earlier LSH round."""
    pair = q_ok[:, None] & k_ok[None, :]
    if HAS_BAND:
        diff = qi[:, None] - kj[None, :]
        pair = pair & (diff <= BAND) & (diff >= -BAND)
    if DEDUP:
        for earlier in range(0, ROUND):
            qb = tl.load(Q_BUCKET_ROW + earlier * stride_qbr + qi, mask=q_ok, other=-1)
            kb = tl.load(K_BUCKET_ROW + earlier * stride_kbr + kj, mask=k_ok, other=-2)
            pair = pair & (qb[:, None] != kb[None, :])
    return pair


@triton.jit
def tile_and_first_row(TQ, BLOCK_Q: tl.constexpr):
    """Axis 0 of the sparse kernels' grid runs over (tile t, query sub-block j): a program takes rows
    j * BLOCK_Q .. of tile t's query list and all of the tile's keys. Returns (t, j * BLOCK_Q)."""
    n_sub = tl.cdiv(TQ, BLOCK_Q)
    return tl.program_id(0) // n_sub, (tl.program_id(0) % n_sub) * BLOCK_Q


@triton.jit
def load_query_tile(Q_LIST, TQ, N, q_base, stride_qn, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile's query positions qi (N = empty), q_ok and q (BLOCK_Q, BLOCK_D)."""
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    qi = tl.load(Q_LIST + offs_q, mask=offs_q < TQ, other=N)
    q_ok = qi < N
    q = tl.load(q_base + qi[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return qi, q_ok, q
