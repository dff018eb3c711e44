"""Triton backward kernels of Scatterbrain attention (non-causal).

Formulas: shared/docs/scatterbrain-math.md, "Backward", in the stabilised units of the forward
(scatterbrain_fwd.py). Per row i, with the forward's stabiliser r_i and denominator den_i:
    G_i = dO_i / den_i,  delta_i = G_i . O_i,  dA_ij = G_i . v_j - delta_i,
    P_if = exp(l(q_i)_f + g_f - r_i) / m,  Kt_jf = exp(l(k_j)_f - g_f),
    E_ij = exp(s_ij - r_i) and C_ij = E_ij - P_i . Kt_j on the support.
  dv_j = Kt_j . QG + sum_{i: j in Sup_i} C_ij G_i                 with QG_f = sum_i P_if G_i
  ds_ij = E_ij dA_ij on the support: dq_i += tau ds_ij k_j, dk_j += tau ds_ij q_i
  feature paths, u = d(phi) * phi:
    u_if = P_if (G_i . KV_f - delta_i z_f - sum_{j in Sup_i} dA_ij Kt_jf)
    u_jf = Kt_jf (v_j . QG_f - qd_f - sum_{i: j in Sup_i} dA_ij P_if)  with qd_f = sum_i delta_i P_if
    dq_i += sqrt(tau) W^T u_i - tau q_i sum_f u_if   (and the same for dk_j with u_j, k_j)
Kernels:
  * row_delta_kernel: 1 / den_i (0 for a row without keys) and delta_i = (dO_i . O_i) / den_i (G
    itself is never stored: every kernel forms G_i = dO_i / den_i from the upstream gradient as it
    loads it);
  * query_state_kernel: QG and qd (split over queries and per query head; the host adds the parts
    of each key/value head's group). The per-pair kernels' support sums nearly cancel QG, qd, KV and
    each other where the support holds most of the low-rank mass: their dv takes the correction C
    as hi + lo operands (`split_dot`), their feature sums dA as hi + lo fp16 operands
    (`row_scaled_split`), and their u . W products row-scaled fp16 u (`feature_grad_dot`);
  * key_lowrank_bwd_kernel: the per-key low-rank terms of dk and dv (initialises dk, dv); per-pair
    path only (the full-tile dk/dv kernel adds these terms itself);
  * per tile of a round, two kernels (as flash attention's backward, so that neither carries the
    other side's accumulators through its feature loop):
    - sparse_lowrank_bwd_dq_kernel: BLOCK_Q query rows over the tile's keys in chunks: dq's support
      terms and, in round 0, its low-rank term (in the last key chunk's feature loop). A query is in
      one tile per round, so earlier rounds add into an fp32 sum and the last writes dq in the input
      dtype;
    - sparse_lowrank_bwd_dkdv_kernel: BLOCK_K keys over the tile's queries in chunks, with the
      (keys, queries) tiles held transposed: the support terms of dk and dv, added in fp32 (dv per
      query chunk, dk once after the loop; atomics: a key can sit in several tiles and serves every
      head of its group).
  * full_tile_bwd_dq_kernel and full_tile_bwd_dkdv_kernel in place of those two when every real pair
    of a tile is in the support (one LSH round, `KernelTiles.full_tiles`): the pair sums over the
    tile factorise through its key state VKt_f = sum_j Kt_jf v_j, kt_sum_f (for dq) and its query
    state PG_f = sum_i P_if G_i, Pd_f = sum_i P_if delta_i (for dk, dv):
      u_if = P_if (G_i . (KV_f - VKt_f) - delta_i (z_f - kt_sum_f)),
      dv_j = sum_i E_ij G_i + Kt_j . (QG - PG),  u_jf = Kt_jf (v_j . (QG_f - PG_f) - (qd_f - Pd_f)),
    so no (queries x keys) x features product is formed, and the low-rank terms of all queries come
    with them (the global QG, qd added once per key: by the first tile of its bucket). One dk/dv
    program serves all query heads of its key/value head.
Everything is recomputed from q, k, v, W and the saved (den, r); nothing of size N x m is stored,
and no fp32 copy of dO or of dq (with one round) is made; nor of dk, dv when the full-tile dk/dv
kernel writes them once (no key padding): elsewhere they are added atomically into fp32 buffers.
"""

import math

import torch
import triton
import triton.language as tl

from .host import alert_not_deterministic, cdiv, next_power_of_2
from .scatterbrain_common import (
    NEG, feature_grad_dot, feature_logits, load_backward_rows, load_key_chunk, row_scaled_split, split_dot,
    split_lhs_dot, support_mask, tile_and_first_row, outside_key_state, outside_query_state,
)
from .scatterbrain_fwd import KernelTiles, _pow2, launch_config, precisions, state_blocks


@triton.jit
def row_delta_kernel(GRAD_OUT, OUT, DEN, INV_DEN, DELTA, stride_gb, stride_gh, stride_gn,
                     stride_ob, stride_oh, stride_on, H, N, DV,
                     BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr):
    """inv_den = 1 / den (0 where den <= 0: rows without keys) and delta = (dO . O) * inv_den,
    (B, H, N) contiguous fp32."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_n[:, None] < N) & (offs_dv[None, :] < DV)
    d_out = tl.load(GRAD_OUT + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_dv[None, :],
                    mask=mask, other=0.0).to(tl.float32)
    out = tl.load(OUT + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_dv[None, :],
                  mask=mask, other=0.0).to(tl.float32)
    rows = pid_bh.to(tl.int64) * N + offs_n
    den = tl.load(DEN + rows, mask=offs_n < N, other=0.0)
    inv_den = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(INV_DEN + rows, inv_den, mask=offs_n < N)
    tl.store(DELTA + rows, tl.sum(d_out * out, 1) * inv_den, mask=offs_n < N)


@triton.jit
def query_state_kernel(
    Q, GRAD_OUT, INV_DEN, DELTA, STAB, W, G, QG_PART, QD_PART,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn, stride_sb, stride_sh,
    stride_wm, H, GROUP, N, M, D, DV, rows_per_split, tau, sqrt_tau, inv_m,
    PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_split = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    state = (b * (H // GROUP) + h // GROUP).to(tl.int64)
    f0 = pid_f * BLOCK_F
    offs_f = f0 + tl.arange(0, BLOCK_F)
    f_ok = offs_f < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    grad_base = GRAD_OUT + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    stat_base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    qg = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    qd = tl.zeros((BLOCK_F,), tl.float32)
    start = pid_split * rows_per_split
    for n0 in range(start, start + rows_per_split, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        q = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        inv_den = tl.load(INV_DEN + stat_base + offs_n, mask=n_ok, other=0.0)
        grad = tl.load(grad_base + offs_n[:, None] * stride_gn + offs_dv[None, :],
                       mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32) * inv_den[:, None]
        delta = tl.load(DELTA + stat_base + offs_n, mask=n_ok, other=0.0)
        row = tl.load(STAB + stat_base + offs_n, mask=n_ok, other=0.0)
        qf = q.to(tl.float32)
        lq = feature_logits(q, tl.sum(qf * qf, 1) * (0.5 * tau), W, f0, M, D, stride_wm, sqrt_tau,
                            BLOCK_F, BLOCK_D, PREC)
        # P rounded to q's dtype once, for QG's dot and qd alike: the backward kernels' sums over
        # the support (sum_i dA_ij P_if) cancel against v_j . QG_f - qd_f with that rounded P
        p = tl.where(n_ok[:, None], tl.exp(lq + g[None, :] - row[:, None]) * inv_m, 0.0).to(q.dtype)
        qg += tl.dot(tl.trans(p), grad.to(q.dtype), input_precision=PREC)
        qd += tl.sum(p.to(tl.float32) * delta[:, None], 0)
    part = (pid_bh * tl.num_programs(0) + pid_split).to(tl.int64)
    tl.store(QD_PART + part * M + offs_f, qd, mask=f_ok)
    tl.store(QG_PART + part * M * DV + offs_f[:, None] * DV + offs_dv[None, :], qg,
             mask=f_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def key_lowrank_bwd_kernel(
    K, V, W, G, QG, QD, KEY_VALID, DK, DV_OUT,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn, stride_eb, stride_eh, stride_en,
    stride_wm, stride_valid_b, Hkv, S, M, D, DV, tau, sqrt_tau,
    HAS_VALID: tl.constexpr, PREC: tl.constexpr, FP32_PREC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    state = pid_bh.to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = offs_s < S
    if HAS_VALID:
        ok = ok & (tl.load(KEY_VALID + b * stride_valid_b + offs_s, mask=ok, other=0) != 0)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_s[:, None] * stride_kn
                + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_s[:, None] * stride_vn
                + offs_dv[None, :], mask=ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    kf = k.to(tl.float32)
    k_sq_half = tl.sum(kf * kf, 1) * (0.5 * tau)
    dk = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_S, BLOCK_DV), tl.float32)
    u_sum = tl.zeros((BLOCK_S,), tl.float32)
    for f0 in range(0, M, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < M
        g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
        lk = feature_logits(k, k_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
        kt = tl.exp(tl.where(ok[:, None], lk - g[None, :], NEG))
        qg = tl.load(QG + state * M * DV + offs_f[:, None] * DV + offs_dv[None, :],
                     mask=f_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        qd = tl.load(QD + state * M + offs_f, mask=f_ok, other=0.0)
        dv += tl.dot(kt, qg, input_precision=FP32_PREC)
        u = kt * (tl.dot(v.to(tl.float32), tl.trans(qg), input_precision=FP32_PREC) - qd[None, :])
        w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                    mask=f_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        dk = feature_grad_dot(u, w, dk, PREC, w.dtype == tl.float32)
        u_sum += tl.sum(u, 1)
    dk = dk * sqrt_tau - kf * (u_sum * tau)[:, None]
    tl.store(DK + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_s[:, None] * stride_dn
             + offs_d[None, :], dk, mask=(offs_s[:, None] < S) & (offs_d[None, :] < D))
    tl.store(DV_OUT + b.to(tl.int64) * stride_eb + h.to(tl.int64) * stride_eh + offs_s[:, None] * stride_en
             + offs_dv[None, :], dv, mask=(offs_s[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def sparse_lowrank_bwd_dq_kernel(
    Q, K, V, W, KV, Z, G, GRAD_OUT, INV_DEN, DELTA, STAB, Q_INDEX, K_INDEX, KEY_VALID, Q_BUCKET, K_BUCKET,
    DQ, DQ_OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_sb, stride_sh,
    stride_wm,
    stride_qib, stride_qih, stride_qit,
    stride_kib, stride_kih, stride_kit,
    stride_valid_b,
    stride_qbb, stride_qbh, stride_qbr,
    stride_kbb, stride_kbh, stride_kbr,
    stride_dqb, stride_dqh, stride_dqn,
    H, GROUP, N, S, M, D, DV, TQ, TK, ROUND, BAND, tau, sqrt_tau, inv_m,
    HAS_FEATURES: tl.constexpr, ADD_LOW_RANK: tl.constexpr, LOW_RANK_IN_CHUNK: tl.constexpr,
    READ_DQ: tl.constexpr, LAST_ROUND: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_BAND: tl.constexpr, DEDUP: tl.constexpr, PREC: tl.constexpr, FP32_PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq of BLOCK_Q rows of a tile: the support terms over the tile's keys in chunks of BLOCK_K
    and, in round 0, the low-rank term (in the last key chunk's feature loop when the tile has keys,
    LOW_RANK_IN_CHUNK, so that phi(q) is exponentiated once per chunk and not once more)."""
    pid_t, q0 = tile_and_first_row(TQ, BLOCK_Q)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    b64 = b.to(tl.int64)
    state = (b * (H // GROUP) + hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    stat_base = b64 * stride_sb + h.to(tl.int64) * stride_sh
    qi, q_ok, q, row, delta, grad = load_backward_rows(
        Q_INDEX + b64 * stride_qib + h.to(tl.int64) * stride_qih + pid_t * stride_qit + q0, TQ - q0, N,
        Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, stride_qn,
        GRAD_OUT + b64 * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
        STAB + stat_base, DELTA + stat_base, INV_DEN + stat_base, D, DV, BLOCK_Q, BLOCK_D, BLOCK_DV)
    qf = q.to(tl.float32)
    q_sq_half = tl.sum(qf * qf, 1) * (0.5 * tau)
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

    dq = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    uq_sum = tl.zeros((BLOCK_Q,), tl.float32)
    if ADD_LOW_RANK and not LOW_RANK_IN_CHUNK:
        for f0 in range(0, M, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            f_ok = offs_f < M
            g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
            lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
            p = tl.where(q_ok[:, None], tl.exp(lq + g[None, :] - row[:, None]) * inv_m, 0.0)
            kv = tl.load(KV + state * M * DV + offs_f[:, None] * DV + offs_dv[None, :],
                         mask=f_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            z = tl.load(Z + state * M + offs_f, mask=f_ok, other=0.0)
            u = p * (tl.dot(grad, tl.trans(kv), input_precision=FP32_PREC) - delta[:, None] * z[None, :])
            w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                        mask=f_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            dq = feature_grad_dot(u * sqrt_tau, w, dq, PREC, w.dtype == tl.float32)
            uq_sum += tl.sum(u, 1)

    grad_in = grad.to(q.dtype)
    for k0 in range(0, TK, BLOCK_K):
        kj, k_ok, k, v = load_key_chunk(
            K_INDEX + b64 * stride_kib + hkv.to(tl.int64) * stride_kih + pid_t * stride_kit, k0, TK, S,
            KEY_VALID + b * stride_valid_b, k_base, v_base, stride_kn, stride_vn, D, DV,
            HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
        pair = support_mask(
            qi, q_ok, kj, k_ok, Q_BUCKET + b64 * stride_qbb + h.to(tl.int64) * stride_qbh,
            K_BUCKET + b64 * stride_kbb + hkv.to(tl.int64) * stride_kbh, stride_qbr, stride_kbr, ROUND, BAND,
            HAS_BAND, DEDUP)
        s = tl.where(pair, tl.dot(q, tl.trans(k), input_precision=PREC) * tau, NEG)
        d_attn = tl.where(pair, tl.dot(grad_in, tl.trans(v), input_precision=PREC) - delta[:, None], 0.0)
        ds = tl.where(pair, tl.exp(s - row[:, None]), 0.0) * d_attn * tau
        dq = tl.dot(ds.to(q.dtype), k, dq, input_precision=PREC)
        if HAS_FEATURES:
            kf = k.to(tl.float32)
            k_sq_half = tl.sum(kf * kf, 1) * (0.5 * tau)
            # sum_j dA_ij Kt_jf nearly cancels G_i . KV_f where the support holds most of a row's
            # low-rank mass: fp16 operands for 16-bit inputs (`row_scaled_split`; Kt <= 1), dA as
            # hi + lo (its rounding was the largest term left: fp16 dq 3e-2 where rows amplify it)
            da_hi, da_lo, da_scale = row_scaled_split(d_attn, q.dtype == tl.float32)
            for f0 in range(0, M, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F)
                f_ok = offs_f < M
                g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
                lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
                lk = feature_logits(k, k_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
                p = tl.where(q_ok[:, None], tl.exp(lq + g[None, :] - row[:, None]) * inv_m, 0.0)
                kt = tl.exp(tl.where(k_ok[:, None], lk - g[None, :], NEG)).to(da_hi.dtype)
                x = -split_lhs_dot(da_hi, da_lo, kt, PREC, q.dtype == tl.float32) * da_scale[:, None]  # - sum_j dA_ij Kt_jf
                if LOW_RANK_IN_CHUNK:
                    if k0 + BLOCK_K >= TK:  # once, in the last chunk: + G_i . KV_f - delta_i z_f
                        kv = tl.load(KV + state * M * DV + offs_f[:, None] * DV + offs_dv[None, :],
                                     mask=f_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                        z = tl.load(Z + state * M + offs_f, mask=f_ok, other=0.0)
                        x = tl.dot(grad, tl.trans(kv), x, input_precision=FP32_PREC) - delta[:, None] * z[None, :]
                u = p * x
                w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                            mask=f_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                dq = feature_grad_dot(u * sqrt_tau, w, dq, PREC, w.dtype == tl.float32)
                uq_sum += tl.sum(u, 1)

    dq = dq - qf * (uq_sum * tau)[:, None]
    dq_off = b64 * stride_dqb + h.to(tl.int64) * stride_dqh + qi[:, None].to(tl.int64) * stride_dqn + offs_d[None, :]
    dq_mask = q_ok[:, None] & (offs_d[None, :] < D)
    if READ_DQ:  # the fp32 sum of the earlier rounds
        dq += tl.load(DQ + dq_off, mask=dq_mask, other=0.0)
    if LAST_ROUND:
        tl.store(DQ_OUT + dq_off, dq.to(DQ_OUT.dtype.element_ty), mask=dq_mask)
    else:
        tl.store(DQ + dq_off, dq, mask=dq_mask)


@triton.jit
def sparse_lowrank_bwd_dkdv_kernel(
    Q, K, V, W, G, GRAD_OUT, INV_DEN, DELTA, STAB, Q_INDEX, K_INDEX, KEY_VALID, Q_BUCKET, K_BUCKET,
    DK, DV_OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_sb, stride_sh,
    stride_wm,
    stride_qib, stride_qih, stride_qit,
    stride_kib, stride_kih, stride_kit,
    stride_valid_b,
    stride_qbb, stride_qbh, stride_qbr,
    stride_kbb, stride_kbh, stride_kbr,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, GROUP, N, S, M, D, DV, TQ, TK, ROUND, BAND, tau, sqrt_tau, inv_m,
    HAS_FEATURES: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_BAND: tl.constexpr, DEDUP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The support terms of dk and dv for BLOCK_K keys of a tile, over the tile's queries in chunks
    of BLOCK_Q, added in fp32 (atomics: a key can sit in several tiles and serves every head of its
    group)."""
    pid_t, k0 = tile_and_first_row(TK, BLOCK_K)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    b64 = b.to(tl.int64)
    state = (b * (H // GROUP) + hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kj, k_ok, k, v = load_key_chunk(
        K_INDEX + b64 * stride_kib + hkv.to(tl.int64) * stride_kih + pid_t * stride_kit, k0, TK, S,
        KEY_VALID + b * stride_valid_b, K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh,
        V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh, stride_kn, stride_vn, D, DV,
        HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
    kf = k.to(tl.float32)
    k_sq_half = tl.sum(kf * kf, 1) * (0.5 * tau)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    grad_base = GRAD_OUT + b64 * stride_gb + h.to(tl.int64) * stride_gh
    stat_base = b64 * stride_sb + h.to(tl.int64) * stride_sh

    dk_ptr = DK + b64 * stride_dkb + hkv.to(tl.int64) * stride_dkh + kj[:, None].to(tl.int64) * stride_dkn + offs_d[None, :]
    dv_ptr = (DV_OUT + b64 * stride_dvb + hkv.to(tl.int64) * stride_dvh + kj[:, None].to(tl.int64) * stride_dvn
              + offs_dv[None, :])
    # dk is carried over the query chunks; dv is added per chunk (carrying it too would keep a
    # third fp32 tile live through the feature loop, beside dk and the correction: spills). The
    # (keys, queries) tiles are held transposed, keys as rows, so that every dot takes them as its
    # left operand without a transpose (as flash attention's dk/dv kernel).
    dk = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    uk_sum = tl.zeros((BLOCK_K,), tl.float32)
    for q0 in range(0, TQ, BLOCK_Q):
        qi, q_ok, q, row, delta, grad = load_backward_rows(
            Q_INDEX + b64 * stride_qib + h.to(tl.int64) * stride_qih + pid_t * stride_qit + q0, TQ - q0, N, q_base, stride_qn,
            grad_base, stride_gn, STAB + stat_base, DELTA + stat_base, INV_DEN + stat_base,
            D, DV, BLOCK_Q, BLOCK_D, BLOCK_DV)
        grad_in = grad.to(q.dtype)
        pair_t = tl.trans(support_mask(
            qi, q_ok, kj, k_ok, Q_BUCKET + b64 * stride_qbb + h.to(tl.int64) * stride_qbh,
            K_BUCKET + b64 * stride_kbb + hkv.to(tl.int64) * stride_kbh, stride_qbr, stride_kbr, ROUND, BAND,
            HAS_BAND, DEDUP))
        s_t = tl.where(pair_t, tl.dot(k, tl.trans(q), input_precision=PREC) * tau, NEG)
        exact_t = tl.where(pair_t, tl.exp(s_t - row[None, :]), 0.0)
        d_attn_t = tl.where(pair_t, tl.dot(v, tl.trans(grad_in), input_precision=PREC) - delta[None, :], 0.0)
        dk = tl.dot((exact_t * d_attn_t * tau).to(q.dtype), q, dk, input_precision=PREC)
        corr_t = exact_t  # C^T = exp(s - r) - Kt . P on the support, the low-rank part subtracted in place
        if HAS_FEATURES:
            qf = q.to(tl.float32)
            q_sq_half = tl.sum(qf * qf, 1) * (0.5 * tau)
            # both feature sums nearly cancel the low-rank terms where the support holds most of
            # the mass: fp16 operands for 16-bit inputs (`row_scaled_split`; Kt <= 1), dA as
            # hi + lo (as in dq: fp16 dk 1.7e-3 -> 4.4e-4 there), P rounded to q's dtype first, as
            # in QG (query_state_kernel), then exactly to fp16 (P <= 1/m)
            da_hi, da_lo, da_scale = row_scaled_split(d_attn_t, q.dtype == tl.float32)
            for f0 in range(0, M, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F)
                f_ok = offs_f < M
                g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
                lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
                lk = feature_logits(k, k_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
                p = tl.where(q_ok[:, None], tl.exp(lq + g[None, :] - row[:, None]) * inv_m, 0.0)
                p = p.to(q.dtype).to(da_hi.dtype)
                kt = tl.exp(tl.where(k_ok[:, None], lk - g[None, :], NEG))
                corr_t = tl.dot((-kt).to(da_hi.dtype), tl.trans(p), corr_t, input_precision=PREC)
                x = split_lhs_dot(da_hi, da_lo, p, PREC, q.dtype == tl.float32)
                u = -kt * (x * da_scale[:, None])  # - Kt_jf sum_i dA_ij P_if
                w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                            mask=f_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                dk = feature_grad_dot(u * sqrt_tau, w, dk, PREC, w.dtype == tl.float32)
                uk_sum += tl.sum(u, 1)
            if HAS_BAND or DEDUP:  # else p and kt vanish outside the support already
                corr_t = tl.where(pair_t, corr_t, 0.0)
            dv = split_dot(corr_t, grad_in, tl.zeros((BLOCK_K, BLOCK_DV), tl.float32), PREC)  # cancels Kt . QG
        else:
            dv = tl.dot(corr_t.to(q.dtype), grad_in, input_precision=PREC)
        tl.atomic_add(dv_ptr, dv, mask=k_ok[:, None] & (offs_dv[None, :] < DV), sem="relaxed")
    dk -= kf * (uk_sum * tau)[:, None]
    tl.atomic_add(dk_ptr, dk, mask=k_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")


@triton.jit
def full_tile_bwd_dq_kernel(
    Q, K, V, W, KV, Z, G, GRAD_OUT, INV_DEN, DELTA, STAB, Q_INDEX, K_INDEX, KEY_VALID, DQ_OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_sb, stride_sh,
    stride_wm,
    stride_qib, stride_qih, stride_qit,
    stride_kib, stride_kih, stride_kit,
    stride_valid_b,
    stride_dqb, stride_dqh, stride_dqn,
    H, GROUP, N, S, M, D, DV, TQ, TK, tau, sqrt_tau, inv_m,
    HAS_VALID: tl.constexpr, PREC: tl.constexpr, FP32_PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq of BLOCK_Q rows of a tile when every pair of the tile is in the support (one round; see
    full_tile_fwd_kernel): sum_j dA_ij Kt_jf = G_i . VKt_f - delta_i kt_sum_f over the tile's keys,
    so u_if = P_if (G_i . (KV_f - VKt_f) - delta_i (z_f - kt_sum_f)): the exact part over the key
    chunks, then the low-rank part feature block by feature block, with no (queries x keys) x
    features product."""
    pid_t, q0 = tile_and_first_row(TQ, BLOCK_Q)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    b64 = b.to(tl.int64)
    state = (b * (H // GROUP) + hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    stat_base = b64 * stride_sb + h.to(tl.int64) * stride_sh
    qi, q_ok, q, row, delta, grad = load_backward_rows(
        Q_INDEX + b64 * stride_qib + h.to(tl.int64) * stride_qih + pid_t * stride_qit + q0, TQ - q0, N,
        Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, stride_qn,
        GRAD_OUT + b64 * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
        STAB + stat_base, DELTA + stat_base, INV_DEN + stat_base, D, DV, BLOCK_Q, BLOCK_D, BLOCK_DV)
    qf = q.to(tl.float32)
    q_sq_half = tl.sum(qf * qf, 1) * (0.5 * tau)
    grad_in = grad.to(q.dtype)
    k_list = K_INDEX + b64 * stride_kib + hkv.to(tl.int64) * stride_kih + pid_t * stride_kit
    valid_row = KEY_VALID + b * stride_valid_b
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

    dq = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for k0 in range(0, TK, BLOCK_K):
        kj, k_ok, k, v = load_key_chunk(k_list, k0, TK, S, valid_row, k_base, v_base, stride_kn, stride_vn,
                                        D, DV, HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
        pair = q_ok[:, None] & k_ok[None, :]
        s = tl.where(pair, tl.dot(q, tl.trans(k), input_precision=PREC) * tau, NEG)
        d_attn = tl.dot(grad_in, tl.trans(v), input_precision=PREC) - delta[:, None]
        ds = tl.where(pair, tl.exp(s - row[:, None]) * d_attn, 0.0) * tau
        dq = tl.dot(ds.to(q.dtype), k, dq, input_precision=PREC)

    uq_sum = tl.zeros((BLOCK_Q,), tl.float32)
    for f0 in range(0, M, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < M
        kv, z = outside_key_state(k_list, TK, S, valid_row, k_base, v_base, stride_kn, stride_vn, W,
                                  KV + state * M * DV, Z + state * M, G + state * M, f0, M, D, DV, stride_wm,
                                  tau, sqrt_tau, HAS_VALID, PREC, BLOCK_K, BLOCK_F, BLOCK_D, BLOCK_DV)
        g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
        lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
        p = tl.where(q_ok[:, None], tl.exp(lq + g[None, :] - row[:, None]) * inv_m, 0.0)
        u = p * (tl.dot(grad, tl.trans(kv), input_precision=FP32_PREC) - delta[:, None] * z[None, :])
        w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                    mask=f_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        dq = tl.dot((u * sqrt_tau).to(w.dtype), w, dq, input_precision=PREC)
        uq_sum += tl.sum(u, 1)

    dq = dq - qf * (uq_sum * tau)[:, None]
    tl.store(DQ_OUT + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + qi[:, None].to(tl.int64) * stride_dqn
             + offs_d[None, :], dq.to(DQ_OUT.dtype.element_ty), mask=q_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def full_tile_bwd_dkdv_kernel(
    Q, K, V, W, G, QG, QD, GRAD_OUT, INV_DEN, DELTA, STAB, Q_INDEX, K_INDEX, KEY_VALID, DK, DV_OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_sb, stride_sh,
    stride_wm,
    stride_qib, stride_qih, stride_qit,
    stride_kib, stride_kih, stride_kit,
    stride_valid_b,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, GROUP: tl.constexpr, N, S, M, D, DV, TQ, TK, tau, sqrt_tau, inv_m,
    HAS_VALID: tl.constexpr, ACCUMULATE: tl.constexpr, PREC: tl.constexpr, FP32_PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk and dv for BLOCK_K keys of a tile whose pairs are all in the support (one round), from
    all GROUP query heads of their key/value head, low-rank term included: with the state of the
    queries outside the tile, QG_f - PG_f and qd_f - Pd_f (the group's global QG, qd less the tile's
    own PG_f = sum_i P_if G_i, Pd_f = sum_i P_if delta_i over the group's heads,
    `outside_query_state`),
      dv_j = sum_i E_ij G_i + Kt_j . (QG - PG),  u_jf = Kt_jf (v_j . (QG_f - PG_f) - (qd_f - Pd_f))
    (Kt_j is the same for every head of the group). The exact part over the heads' query chunks
    (tiles held transposed), then the low-rank part feature block by feature block. ACCUMULATE
    (key padding): added in fp32 with atomics, as a bucket may then serve several consecutive tiles
    (identical key lists, so the same first key) of which only the first adds the global QG, qd;
    else every key is in exactly one program, which writes dk, dv once in the output dtype."""
    pid_t, k0 = tile_and_first_row(TK, BLOCK_K)
    pid_bkv = tl.program_id(1)
    kv_heads = H // GROUP
    b = pid_bkv // kv_heads
    hkv = pid_bkv % kv_heads
    b64 = b.to(tl.int64)
    state = pid_bkv.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_list = K_INDEX + b64 * stride_kib + hkv.to(tl.int64) * stride_kih + pid_t * stride_kit
    kj, k_ok, k, v = load_key_chunk(
        k_list, k0, TK, S, KEY_VALID + b * stride_valid_b, K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh,
        V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh, stride_kn, stride_vn, D, DV,
        HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
    kf = k.to(tl.float32)
    k_sq_half = tl.sum(kf * kf, 1) * (0.5 * tau)
    first_of_bucket = (pid_t == 0) | (tl.load(k_list) != tl.load(k_list - stride_kit, mask=pid_t > 0, other=-1))
    h0 = (hkv * GROUP).to(tl.int64)  # the group's first query head
    q_list = Q_INDEX + b64 * stride_qib + h0 * stride_qih + pid_t * stride_qit
    q_base = Q + b64 * stride_qb + h0 * stride_qh
    grad_base = GRAD_OUT + b64 * stride_gb + h0 * stride_gh
    stat_base = b64 * stride_sb + h0 * stride_sh

    dk = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_K, BLOCK_DV), tl.float32)
    for hh in range(GROUP):
        for q0 in range(0, TQ, BLOCK_Q):
            qi, q_ok, q, row, delta, grad = load_backward_rows(
                q_list + hh * stride_qih + q0, TQ - q0, N, q_base + hh * stride_qh, stride_qn,
                grad_base + hh * stride_gh, stride_gn, STAB + stat_base + hh * stride_sh,
                DELTA + stat_base + hh * stride_sh, INV_DEN + stat_base + hh * stride_sh, D, DV,
                BLOCK_Q, BLOCK_D, BLOCK_DV)
            grad_in = grad.to(q.dtype)
            pair_t = k_ok[:, None] & q_ok[None, :]
            s_t = tl.where(pair_t, tl.dot(k, tl.trans(q), input_precision=PREC) * tau, NEG)
            exact_t = tl.where(pair_t, tl.exp(s_t - row[None, :]), 0.0)
            d_attn_t = tl.dot(v, tl.trans(grad_in), input_precision=PREC) - delta[None, :]
            dk = tl.dot((exact_t * d_attn_t * tau).to(q.dtype), q, dk, input_precision=PREC)
            dv = tl.dot(exact_t.to(q.dtype), grad_in, dv, input_precision=PREC)

    uk_sum = tl.zeros((BLOCK_K,), tl.float32)
    for f0 in range(0, M, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < M
        qg, qd = outside_query_state(q_list, stride_qih, TQ, N, q_base, stride_qh, stride_qn, grad_base, stride_gh,
                                     stride_gn, STAB + stat_base, DELTA + stat_base, INV_DEN + stat_base, stride_sh,
                                     W, G + state * M, QG + state * M * DV, QD + state * M, first_of_bucket,
                                     f0, M, D, DV, stride_wm, tau, sqrt_tau, inv_m, GROUP, PREC,
                                     BLOCK_Q, BLOCK_F, BLOCK_D, BLOCK_DV)
        g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
        lk = feature_logits(k, k_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
        kt = tl.exp(tl.where(k_ok[:, None], lk - g[None, :], NEG))
        dv = tl.dot(kt, qg, dv, input_precision=FP32_PREC)
        u = kt * (tl.dot(v.to(tl.float32), tl.trans(qg), input_precision=FP32_PREC) - qd[None, :])
        w = tl.load(W + offs_f[:, None] * stride_wm + offs_d[None, :],
                    mask=f_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        dk = tl.dot((u * sqrt_tau).to(w.dtype), w, dk, input_precision=PREC)
        uk_sum += tl.sum(u, 1)
    dk -= kf * (uk_sum * tau)[:, None]
    k_rows = kj[:, None].to(tl.int64)
    dk_ptr = DK + b64 * stride_dkb + hkv.to(tl.int64) * stride_dkh + k_rows * stride_dkn + offs_d[None, :]
    dv_ptr = DV_OUT + b64 * stride_dvb + hkv.to(tl.int64) * stride_dvh + k_rows * stride_dvn + offs_dv[None, :]
    dk_mask = k_ok[:, None] & (offs_d[None, :] < D)
    dv_mask = k_ok[:, None] & (offs_dv[None, :] < DV)
    if ACCUMULATE:
        tl.atomic_add(dk_ptr, dk, mask=dk_mask, sem="relaxed")
        tl.atomic_add(dv_ptr, dv, mask=dv_mask, sem="relaxed")
    else:  # this program is the only one to see its keys: written once, in the output dtype
        tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=dk_mask)
        tl.store(dv_ptr, dv.to(DV_OUT.dtype.element_ty), mask=dv_mask)


# ----------------------------------------------------------------------------- launcher


def sparse_lowrank_backward(q, k, v, out, grad_out, w, state, plan, den, stab, *, tau, key_valid,
                            dq_launch=None, dkdv_launch=None, block_s=None, rows_per_split=1024):
    """(dq, dk, dv) in the input dtypes for the forward `sparse_lowrank_forward` computed.

    out, den, stab: the forward's outputs; state = (KV, z, g) of `key_state` or None.
    dq_launch, dkdv_launch: (BLOCK_Q, BLOCK_K, BLOCK_F, num_warps) of the dq and dk/dv kernels, any
    entry None for `launch_config`'s ('full_backward_dq', 'full_backward_dkdv' for full tiles,
    `KernelTiles.full_tiles`; else 'backward_dq', 'backward_dkdv').
    """
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    device = q.device
    has_features = w is not None
    m = w.shape[0] if has_features else 0
    prec, fp32_prec = precisions(q.dtype)
    # the state kernels' rows per step and features (`state_blocks`); 64 features spill in the
    # query state beyond head dim 64 (96 B at 128) and in the per-key low-rank kernel (8 B at 64)
    rows, state_f = state_blocks(prec)
    block_s = block_s or rows
    query_block_f = state_f if max(dim, v_dim) <= 64 else min(state_f, 32)
    key_block_f = min(state_f, 32)
    sqrt_tau, inv_m = math.sqrt(tau), 1.0 / max(m, 1)
    grad = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    stab, den = stab.contiguous(), den.contiguous()
    inv_den, delta = torch.empty_like(den), torch.empty_like(den)
    row_delta_kernel[(cdiv(n_q, block_s), batch * heads)](
        grad, out, den, inv_den, delta, grad.stride(0), grad.stride(1), grad.stride(2),
        out.stride(0), out.stride(1), out.stride(2), heads, n_q, v_dim,
        BLOCK_N=block_s, BLOCK_DV=_pow2(v_dim),
    )
    tiles = KernelTiles.from_plan(plan, batch, heads, kv_heads, n_q, device)
    full = tiles.full_tiles(has_features, dim, v_dim)  # one round, every pair of a tile in the support
    # full tiles without key padding: each key sits in exactly one dk/dv program (a round's key lists
    # partition the keys; the program serves all query heads of its key/value head), which writes
    # dk, dv once in k's dtype; otherwise the kernels add into fp32 buffers
    write_once = full and key_valid is None
    # Each key's dk, dv take one atomic add per (tile holding it, program serving it): a single add
    # onto the per-key low-rank term (or zero) is order-free. That is one LSH round without key
    # padding (its key lists partition the keys) with one query head per key/value head on the
    # per-pair kernels (whose programs are per query head); else several adds in varying order.
    one_add = tiles.n_rounds == 1 and not tiles.has_band and key_valid is None and (full or group == 1)
    if tiles.tk > 0 and not one_add:
        alert_not_deterministic(
            "The Triton backward of Scatterbrain with local windows, several LSH rounds, key padding, or "
            "grouped-query heads on the per-pair kernels (head dims over 64, no low-rank term, or one bucket "
            "holding every key), which adds each key's dk, dv from several programs,",
            "One LSH round without key padding is deterministic (with grouped-query heads: at head dims <= 64 "
            "with a low-rank term); backend='reference' runs torch ops, which follow torch's own settings.")
    if write_once:
        dk = torch.empty(batch, kv_heads, n_k, dim, device=device, dtype=k.dtype)
        dv = torch.empty(batch, kv_heads, n_k, v_dim, device=device, dtype=v.dtype)
    else:
        dk = torch.zeros(batch, kv_heads, n_k, dim, device=device, dtype=torch.float32)
        dv = torch.zeros(batch, kv_heads, n_k, v_dim, device=device, dtype=torch.float32)
    valid = key_valid.contiguous() if key_valid is not None else dk  # (bool or int8: Triton loads *i1 as bytes)
    valid_stride = valid.stride(0) if key_valid is not None else 0

    if has_features:
        kv, z, g = state
        rows_per_split = max(block_s, min(rows_per_split, next_power_of_2(n_q)))
        rows_per_split = math.ceil(rows_per_split / block_s) * block_s
        n_splits = math.ceil(n_q / rows_per_split)
        qg_part = torch.empty(batch * heads, n_splits, m, v_dim, device=device, dtype=torch.float32)
        qd_part = torch.empty(batch * heads, n_splits, m, device=device, dtype=torch.float32)
        query_state_kernel[(n_splits, cdiv(m, query_block_f), batch * heads)](
            q, grad, inv_den, delta, stab, w, g, qg_part, qd_part,
            q.stride(0), q.stride(1), q.stride(2), grad.stride(0), grad.stride(1), grad.stride(2),
            stab.stride(0), stab.stride(1), w.stride(0), heads, group, n_q, m, dim, v_dim,
            rows_per_split, tau, sqrt_tau, inv_m,
            PREC=prec, BLOCK_N=block_s, BLOCK_F=query_block_f, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim),
        )
        # per key/value head: the sums over the query splits and the heads of each group
        if n_splits * group == 1:
            qg, qd = qg_part[:, 0], qd_part[:, 0]
        else:
            qg = qg_part.reshape(batch * kv_heads, group * n_splits, m, v_dim).sum(1)
            qd = qd_part.reshape(batch * kv_heads, group * n_splits, m).sum(1)
        if not full:  # (the full-tile dk/dv kernel adds the per-key low-rank terms itself)
            key_lowrank_bwd_kernel[(cdiv(n_k, block_s), batch * kv_heads)](
                k, v, w, g, qg, qd, valid, dk, dv,
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                w.stride(0), valid_stride, kv_heads, n_k, m, dim, v_dim, tau, sqrt_tau,
                HAS_VALID=key_valid is not None, PREC=prec, FP32_PREC=fp32_prec,
                BLOCK_S=block_s, BLOCK_F=key_block_f, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim),
            )
    else:
        kv = z = g = dk  # unused pointers
    w_arg = w if has_features else dk

    # dq: each query sits in exactly one tile per round, so the last round writes it in q's dtype;
    # an fp32 accumulator carries the earlier rounds (none with one round)
    dq = torch.empty(batch, heads, n_q, dim, device=device, dtype=q.dtype)
    dq_acc = dq if tiles.n_rounds == 1 else torch.empty(batch, heads, n_q, dim, device=device, dtype=torch.float32)
    fp32 = q.dtype == torch.float32
    kinds = ("full_backward_dq", "full_backward_dkdv") if full else ("backward_dq", "backward_dkdv")
    dq_launch = tuple(given or fallback for given, fallback in zip(
        dq_launch or (None,) * 4, launch_config(kinds[0], tiles.tq, tiles.tk, dim, v_dim, prec, fp32)))
    dkdv_launch = tuple(given or fallback for given, fallback in zip(
        dkdv_launch or (None,) * 4, launch_config(kinds[1], tiles.tq, tiles.tk, dim, v_dim, prec, fp32)))
    def strides(qi, kj):  # the arguments both paths' kernels share, in their order
        return (q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                grad.stride(0), grad.stride(1), grad.stride(2),
                stab.stride(0), stab.stride(1),
                w_arg.stride(0),
                qi.stride(0), qi.stride(1), qi.stride(2),
                kj.stride(0), kj.stride(1), kj.stride(2),
                valid_stride)

    if full:
        qi, kj = tiles.q_index[:, :, 0], tiles.k_index[:, :, 0]
        sizes = (heads, group, n_q, n_k, m, dim, v_dim, tiles.tq, tiles.tk, tau, sqrt_tau, inv_m)
        flags = dict(HAS_VALID=key_valid is not None, PREC=prec, FP32_PREC=fp32_prec,
                     BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim))
        bq, bk, bf, warps = dq_launch
        full_tile_bwd_dq_kernel[(tiles.n_tiles * cdiv(tiles.tq, bq), batch * heads)](
            q, k, v, w, kv, z, g, grad, inv_den, delta, stab, qi, kj, valid, dq, *strides(qi, kj),
            dq.stride(0), dq.stride(1), dq.stride(2), *sizes,
            BLOCK_Q=bq, BLOCK_K=bk, BLOCK_F=bf, num_warps=warps, **flags,
        )
        bq, bk, bf, warps = dkdv_launch
        full_tile_bwd_dkdv_kernel[(tiles.n_tiles * cdiv(tiles.tk, bk), batch * kv_heads)](
            q, k, v, w, g, qg, qd, grad, inv_den, delta, stab, qi, kj, valid, dk, dv, *strides(qi, kj),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2), *sizes,
            ACCUMULATE=not write_once, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_F=bf, num_warps=warps, **flags,
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype)  # (no copy when written once)
    bucket_strides = (tiles.q_bucket.stride(0), tiles.q_bucket.stride(1), tiles.q_bucket.stride(2),
                      tiles.k_bucket.stride(0), tiles.k_bucket.stride(1), tiles.k_bucket.stride(2))
    sizes = lambda r: (heads, group, n_q, n_k, m, dim, v_dim, tiles.tq, tiles.tk, r, tiles.band,  # noqa: E731
                       tau, sqrt_tau, inv_m)
    for r in range(tiles.n_rounds):
        qi, kj = tiles.q_index[:, :, r], tiles.k_index[:, :, r]
        flags = dict(HAS_VALID=key_valid is not None, HAS_BAND=tiles.has_band, DEDUP=tiles.dedup and r > 0,
                     PREC=prec, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim))
        bq, bk, bf, warps = dq_launch
        sparse_lowrank_bwd_dq_kernel[(tiles.n_tiles * cdiv(tiles.tq, bq), batch * heads)](
            q, k, v, w_arg, kv, z, g, grad, inv_den, delta, stab, qi, kj, valid, tiles.q_bucket, tiles.k_bucket,
            dq_acc, dq, *strides(qi, kj), *bucket_strides,
            dq.stride(0), dq.stride(1), dq.stride(2),
            *sizes(r),
            HAS_FEATURES=has_features, ADD_LOW_RANK=has_features and r == 0,
            LOW_RANK_IN_CHUNK=has_features and r == 0 and tiles.tk > 0,
            READ_DQ=r > 0, LAST_ROUND=r == tiles.n_rounds - 1, FP32_PREC=fp32_prec,
            BLOCK_Q=bq, BLOCK_K=bk, BLOCK_F=bf, num_warps=warps, **flags,
        )
        if tiles.tk == 0:
            continue
        bq, bk, bf, warps = dkdv_launch
        sparse_lowrank_bwd_dkdv_kernel[(tiles.n_tiles * cdiv(tiles.tk, bk), batch * heads)](
            q, k, v, w_arg, g, grad, inv_den, delta, stab, qi, kj, valid, tiles.q_bucket, tiles.k_bucket,
            dk, dv, *strides(qi, kj), *bucket_strides,
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            *sizes(r),
            HAS_FEATURES=has_features,
            BLOCK_Q=bq, BLOCK_K=bk, BLOCK_F=bf, num_warps=warps, **flags,
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
