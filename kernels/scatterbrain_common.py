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
def row_scaled_operand(x, FP32: tl.constexpr):
    """(x / s, s) with s_i = max_j |x_ij| (1 for a row of zeros or fp32 subnormals, whose 1 / s_i
    would overflow: those round to fp16 zeros, as unscaled): x / s as a dot operand, fp32 for fp32
    inputs, fp16 for 16-bit ones (bf16 too: |x / s| <= 1 cannot overflow fp16, and its 11
    significant bits against bf16's 8 matter where the dot's sum nearly cancels another)."""
    s = tl.max(tl.abs(x), 1)
    s = tl.where(s >= 1.1754944e-38, s, 1.0)  # the smallest normal fp32
    y = x * (1.0 / s)[:, None]
    if not FP32:
        y = y.to(tl.float16)
    return y, s


@triton.jit
def row_scaled_split(x, FP32: tl.constexpr):
    """(hi, lo, s): x / s (`row_scaled_operand`) as hi + lo fp16 dot operands for 16-bit inputs
    (about 22 significant bits, for a dA whose sums nearly cancel the low-rank state's); fp32
    inputs: hi = x / s in fp32 and lo unused (`split_lhs_dot` skips it)."""
    hi, s = row_scaled_operand(x, FP32)
    lo = hi
    if not FP32:
        lo = (x * (1.0 / s)[:, None] - hi.to(tl.float32)).to(tl.float16)
    return hi, lo, s


@triton.jit
def split_lhs_dot(hi, lo, y, PREC: tl.constexpr, FP32: tl.constexpr):
    """hi @ y, plus lo @ y for 16-bit inputs: a `row_scaled_split` operand times y (fp32 result)."""
    acc = tl.dot(hi, y, input_precision=PREC)
    if not FP32:
        acc = tl.dot(lo, y, acc)
    return acc


@triton.jit
def split_dot(x, y, acc, PREC: tl.constexpr):
    """acc + x @ y for an fp32 x whose rounding to y's 16-bit dtype would be amplified (per-pair
    path: a correction exp(s - r) - phi . phi, or a low-rank state, whose products nearly cancel
    another kernel's where the support holds most of a row's low-rank mass): x as hi + lo, two
    operands of y's dtype (about 16 significant bits for bf16, 22 for fp16). fp32 y: one dot."""
    if y.dtype == tl.float32:
        acc = tl.dot(x, y, acc, input_precision=PREC)
    else:
        hi = x.to(y.dtype)
        acc = tl.dot(hi, y, acc, input_precision=PREC)
        acc = tl.dot((x - hi.to(tl.float32)).to(y.dtype), y, acc, input_precision=PREC)
    return acc


@triton.jit
def feature_grad_dot(u, w, acc, PREC: tl.constexpr, FP32: tl.constexpr):
    """acc + u @ w for a feature gradient u (rows x features) and W's rows w (features x D). For
    16-bit inputs u is row-scaled to fp16 (`row_scaled_operand`) and w widened to fp16 (W's bf16
    values are fp16 values), not rounded to bf16: in the per-pair path sums of u . W computed in
    different kernels or key chunks nearly cancel where the support holds most of the mass."""
    if FP32:
        acc = tl.dot(u, w, acc, input_precision=PREC)
    else:
        u_op, u_scale = row_scaled_operand(u, False)
        acc += tl.dot(u_op, w.to(tl.float16), input_precision=PREC) * u_scale[:, None]
    return acc


@triton.jit
def load_key_chunk(K_LIST, k0, TK, S, VALID_ROW, k_base, v_base, stride_kn, stride_vn, D, DV,
                   HAS_VALID: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """Keys k0 .. k0 + BLOCK_K of a tile's key list: positions kj (S = empty), k_ok, k, v."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kj = tl.load(K_LIST + offs_k, mask=offs_k < TK, other=S).to(tl.int32)  # lists: int32 or int64
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
            qb = tl.load(Q_BUCKET_ROW + earlier * stride_qbr + qi, mask=q_ok, other=-1).to(tl.int32)
            kb = tl.load(K_BUCKET_ROW + earlier * stride_kbr + kj, mask=k_ok, other=-2).to(tl.int32)
            pair = pair & (qb[:, None] != kb[None, :])
    return pair


@triton.jit
def tile_and_first_row(TQ, BLOCK_Q: tl.constexpr):
    """Axis 0 of the sparse kernels' grid runs over (tile t, sub-block j) of a list of TQ entries per
    tile, BLOCK_Q per program: query rows j * BLOCK_Q .. of tile t (forward, dq kernels) or, called
    with (TK, BLOCK_K), its keys (dk/dv kernels). Returns (t, j * BLOCK_Q)."""
    n_sub = tl.cdiv(TQ, BLOCK_Q)
    return tl.program_id(0) // n_sub, (tl.program_id(0) % n_sub) * BLOCK_Q


@triton.jit
def load_query_tile(Q_LIST, TQ, N, q_base, stride_qn, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile's query positions qi (N = empty), q_ok and q (BLOCK_Q, BLOCK_D)."""
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    qi = tl.load(Q_LIST + offs_q, mask=offs_q < TQ, other=N).to(tl.int32)  # lists: int32 or int64
    q_ok = qi < N
    q = tl.load(q_base + qi[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return qi, q_ok, q


@triton.jit
def load_backward_rows(Q_LIST, TQ, N, q_base, stride_qn, grad_base, stride_gn, STAB_ROW, DELTA_ROW, INV_DEN_ROW,
                       D, DV, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A tile's query rows as the backward kernels need them: qi, q_ok, q (as `load_query_tile`),
    the forward's stabiliser r_i, delta_i, and G_i = dO_i / den_i (BLOCK_Q, BLOCK_DV) fp32, rounded
    to q's dtype: the dots that take G as an operand round it so, and the fp32 products with the
    low-rank state (G . KV) must see the same G, or their near-cancellation on the support (sum_j
    dA_ij Kt_jf against G_i . KV_f) leaves the rounding of G times |KV| behind."""
    qi, q_ok, q = load_query_tile(Q_LIST, TQ, N, q_base, stride_qn, D, BLOCK_Q, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = tl.load(STAB_ROW + qi, mask=q_ok, other=0.0)
    delta = tl.load(DELTA_ROW + qi, mask=q_ok, other=0.0)
    inv_den = tl.load(INV_DEN_ROW + qi, mask=q_ok, other=0.0)
    grad = tl.load(grad_base + qi[:, None].to(tl.int64) * stride_gn + offs_dv[None, :],
                   mask=q_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    return qi, q_ok, q, row, delta, (grad.to(tl.float32) * inv_den[:, None]).to(q.dtype).to(tl.float32)


@triton.jit
def outside_key_state(K_LIST, TK, S, VALID_ROW, k_base, v_base, stride_kn, stride_vn, W, KV_ROW, Z_ROW, G_ROW,
                      f0, M, D, DV, stride_wm, tau, sqrt_tau, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The low-rank state of the keys outside one tile's key list, features f0 .. f0 + BLOCK_F:
    KV_f - VKt_f (BLOCK_F, BLOCK_DV) and z_f - kt_sum_f, fp32, where VKt_f = sum_j Kt_jf v_j and
    kt_sum_f = sum_j Kt_jf over the list's real keys, Kt_jf = exp(l(k_j)_f - g_f), in the units of
    the global state KV, z (key_state_kernel)."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    f_ok = offs_f < M
    g = tl.load(G_ROW + offs_f, mask=f_ok, other=0.0)
    vkt = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    kt_sum = tl.zeros((BLOCK_F,), tl.float32)
    for k0 in range(0, TK, BLOCK_K):
        kj, k_ok, k, v = load_key_chunk(K_LIST, k0, TK, S, VALID_ROW, k_base, v_base, stride_kn, stride_vn,
                                        D, DV, HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
        kf = k.to(tl.float32)
        lk = feature_logits(k, tl.sum(kf * kf, 1) * (0.5 * tau), W, f0, M, D, stride_wm, sqrt_tau,
                            BLOCK_F, BLOCK_D, PREC)
        kt = tl.exp(tl.where(k_ok[:, None], lk - g[None, :], NEG))
        vkt = tl.dot(tl.trans(kt).to(v.dtype), v, vkt, input_precision=PREC)
        kt_sum += tl.sum(kt, 0)
    kv = tl.load(KV_ROW + offs_f[:, None] * DV + offs_dv[None, :], mask=f_ok[:, None] & (offs_dv[None, :] < DV),
                 other=0.0)
    return kv - vkt, tl.load(Z_ROW + offs_f, mask=f_ok, other=0.0) - kt_sum


@triton.jit
def outside_query_state(Q_LIST, stride_list_h, TQ, N, q_base, stride_qh, stride_qn, grad_base, stride_gh,
                        stride_gn, STAB_ROW, DELTA_ROW, INV_DEN_ROW, stride_stat_h, W, G_ROW, QG_ROW, QD_ROW,
                        ADD_GLOBAL, f0, M, D, DV, stride_wm, tau, sqrt_tau, inv_m, GROUP: tl.constexpr,
                        PREC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr):
    """The backward's low-rank query state less one tile's own, features f0 .. f0 + BLOCK_F:
    QG_f - PG_f (BLOCK_F, BLOCK_DV) and qd_f - Pd_f, fp32, where PG_f = sum_i P_if G_i and
    Pd_f = sum_i P_if delta_i over the tile's real queries of GROUP consecutive query heads (the
    pointers are the first head's; the others follow at the given head strides),
    P_if = exp(l(q_i)_f + g_f - r_i) / m, G_i = dO_i / den_i, and QG, qd are the sums over all
    queries of those heads (query_state_kernel), added only where ADD_GLOBAL (a scalar bool; else
    -PG_f and -Pd_f are returned)."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    f_ok = offs_f < M
    g = tl.load(G_ROW + offs_f, mask=f_ok, other=0.0)
    pg = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    pd = tl.zeros((BLOCK_F,), tl.float32)
    for hh in range(GROUP):
        for q0 in range(0, TQ, BLOCK_Q):
            qi, q_ok, q, row, delta, grad = load_backward_rows(
                Q_LIST + hh * stride_list_h + q0, TQ - q0, N, q_base + hh * stride_qh, stride_qn,
                grad_base + hh * stride_gh, stride_gn, STAB_ROW + hh * stride_stat_h, DELTA_ROW + hh * stride_stat_h,
                INV_DEN_ROW + hh * stride_stat_h, D, DV, BLOCK_Q, BLOCK_D, BLOCK_DV)
            qf = q.to(tl.float32)
            lq = feature_logits(q, tl.sum(qf * qf, 1) * (0.5 * tau), W, f0, M, D, stride_wm, sqrt_tau,
                                BLOCK_F, BLOCK_D, PREC)
            p = tl.where(q_ok[:, None], tl.exp(lq + g[None, :] - row[:, None]) * inv_m, 0.0).to(q.dtype)
            pg = tl.dot(tl.trans(p), grad.to(q.dtype), pg, input_precision=PREC)
            pd += tl.sum(p.to(tl.float32) * delta[:, None], 0)  # the same rounded P as PG (and QG, qd)
    qg = tl.load(QG_ROW + offs_f[:, None] * DV + offs_dv[None, :], mask=f_ok[:, None] & (offs_dv[None, :] < DV),
                 other=0.0)
    qd = tl.load(QD_ROW + offs_f, mask=f_ok, other=0.0)
    return tl.where(ADD_GLOBAL, qg, 0.0) - pg, tl.where(ADD_GLOBAL, qd, 0.0) - pd
