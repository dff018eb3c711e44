"""Triton forward kernels of Scatterbrain attention (non-causal).

Math and stabilisers: scatterattn/reference.py (the PyTorch reference these kernels must match) and
shared/docs/scatterbrain-math.md. Per (batch, head), with q~ = sqrt(tau) q, k~ = sqrt(tau) k and
feature logits l(x)_f = w_f . x~ - |x~|^2 / 2:

1. `key_state_kernel`, grid (key splits, feature chunks, B * Hkv): for its keys and features, the
   per-feature maximum g_f of l(k)_f and the partial sums KV_f = sum_j exp(l(k_j)_f - g_f) v_j,
   z_f = sum_j exp(l(k_j)_f - g_f), rescaled online as the maximum grows. phi(K) is never stored;
   `combine_key_state_kernel` merges the splits (split-K style) at the global maximum g_f.
2. `sparse_lowrank_fwd_kernel`, grid (tiles, B * H) for one round: a tile's queries and keys are
   loaded through the plan's index lists (no gathered copies). With r_i the row stabiliser:
     phi_if = exp(l(q_i)_f + g_f - r_i) / m,  num_i = phi_i . KV + sum_{j in Sup_i} C_ij v_j,
     den_i = phi_i . z + sum_{j in Sup_i} C_ij,   C_ij = exp(s_ij - r_i) - phi_i . phi~_j
   where phi~_jf = exp(l(k_j)_f - g_f). r_i starts at max_f (l(q_i)_f + g_f) and grows online over
   the key chunks (flash style). The low-rank term is added in round 0 only; each round writes
   (num, den, r) and `combine_rounds` merges rounds, or round 0 of a one-round plan writes O.
   When the tile has keys (LOW_RANK_IN_CHUNK), the first feature pass only finds the low-rank part
   of r_i (a dot and a max, no exp) and phi_i . KV, phi_i . z are added in the last key chunk's
   feature loop, where r_i is final and phi_i is computed anyway: one exp of phi(q) fewer per key
   list. A tile without keys (no sparse support) adds them in the first pass.
3. `full_tile_fwd_kernel`, in place of 2 when every real pair of every tile is in the support (one
   LSH round; `KernelTiles.full_tiles`): sum_j C_ij v_j = sum_j exp(s_ij - r_i) v_j - phi_i . VKt
   with VKt_f = sum_{j in tile} phi~_jf v_j, the tile's own key state, so the output is exact
   attention inside the tile plus phi_i . (KV - VKt) (and likewise den): the same function with no
   per-pair feature products (per query, buckets of 128, m = 256, D = 64: 80k multiply-adds and
   640 exps instead of 128k and 896).

Dots take the input dtype (fp16/bf16) with fp32 accumulation (PREC applies to fp32 operands:
`precisions`, TF32 or IEEE after torch's matmul setting); the products with the fp32 state KV use
FP32_PREC ('tf32' for half inputs, as PREC for fp32), except that for bf16 inputs the full-tile
kernel rounds KV - VKt (after the subtraction) to bf16 (|KV| <= S max|v| would overflow fp16).
The per-pair kernel's C_ij nearly cancels phi_i . KV where the support holds most of a row's
low-rank mass (a bucket or window covering most keys): there phi_i . phi~_j takes fp16 operands
(also for bf16 inputs), C . v and the key state's phi~^T v take C and phi~ as hi + lo operands
(`split_dot`; `key_state(split=True)` for per-pair plans), so both sides of the cancellation keep
about 11 significant bits or more. The feature matrix is rounded to the input dtype once, by the
caller.
"""

import triton
import triton.language as tl

from .scatterbrain_common import (
    NEG, feature_logits, load_key_chunk, load_query_tile, split_dot, support_mask, tile_and_first_row,
    outside_key_state,
)


@triton.jit
def key_state_kernel(
    K, V, W, KEY_VALID, KV_PART, Z_PART, MAX_PART,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_wm, stride_valid_b,
    Hkv, S, M, D, DV, keys_per_split, sqrt_tau,
    HAS_VALID: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_split = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    n_splits = tl.num_programs(0)
    f0 = pid_f * BLOCK_F
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    run_max = tl.full((BLOCK_F,), NEG, tl.float32)
    acc = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    z_acc = tl.zeros((BLOCK_F,), tl.float32)
    start = pid_split * keys_per_split
    for s0 in range(start, start + keys_per_split, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = offs_s < S
        if HAS_VALID:
            valid = valid & (tl.load(KEY_VALID + b * stride_valid_b + offs_s, mask=valid, other=0) != 0)
        k = tl.load(k_base + offs_s[:, None] * stride_kn + offs_d[None, :],
                    mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + offs_s[:, None] * stride_vn + offs_dv[None, :],
                    mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        kf = k.to(tl.float32)
        k_sq_half = tl.sum(kf * kf, 1) * (0.5 * sqrt_tau * sqrt_tau)
        logits = feature_logits(k, k_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
        logits = tl.where(valid[:, None], logits, NEG)
        new_max = tl.maximum(run_max, tl.max(logits, 0))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(tl.where(valid[:, None], logits - new_max[None, :], NEG))
        if SPLIT:  # the per-pair kernels subtract phi_q . Kt v over the support from phi_q . KV
            acc = split_dot(tl.trans(p), v, acc * alpha[:, None], PREC)
        else:
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p).to(v.dtype), v, input_precision=PREC)
        z_acc = z_acc * alpha + tl.sum(p, 0)
        run_max = new_max

    offs_f = f0 + tl.arange(0, BLOCK_F)
    f_ok = offs_f < M
    part = (pid_bh * n_splits + pid_split).to(tl.int64)
    if n_splits == 1:  # the final state, as combine_key_state_kernel would make it: g = 0 without real keys
        run_max = tl.where(run_max > NEG * 0.5, run_max, 0.0)
    tl.store(MAX_PART + part * M + offs_f, run_max, mask=f_ok)
    tl.store(Z_PART + part * M + offs_f, z_acc, mask=f_ok)
    tl.store(KV_PART + part * M * DV + offs_f[:, None] * DV + offs_dv[None, :], acc,
             mask=f_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def combine_key_state_kernel(KV_PART, Z_PART, MAX_PART, KV, Z, G, N_SPLITS, M, DV,
                             BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (state b*Hkv + h, feature block): g_f = max over splits of the split maxima (0 when
    no split saw a real key) and KV_f, z_f = sum over splits of the partial sums times
    exp(split max - g_f)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    f_ok = offs_f < M
    kv_mask = f_ok[:, None] & (offs_dv[None, :] < DV)
    g = tl.full((BLOCK_F,), NEG, tl.float32)
    for split in range(N_SPLITS):
        g = tl.maximum(g, tl.load(MAX_PART + (pid_bh * N_SPLITS + split) * M + offs_f, mask=f_ok, other=NEG))
    g = tl.where(g > NEG * 0.5, g, 0.0)  # no real key at all: any shift works
    kv = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    z = tl.zeros((BLOCK_F,), tl.float32)
    for split in range(N_SPLITS):
        part = pid_bh * N_SPLITS + split
        weight = tl.exp(tl.load(MAX_PART + part * M + offs_f, mask=f_ok, other=NEG) - g)
        kv += tl.load(KV_PART + part * M * DV + offs_f[:, None] * DV + offs_dv[None, :], mask=kv_mask,
                      other=0.0) * weight[:, None]
        z += tl.load(Z_PART + part * M + offs_f, mask=f_ok, other=0.0) * weight
    tl.store(G + pid_bh * M + offs_f, g, mask=f_ok)
    tl.store(Z + pid_bh * M + offs_f, z, mask=f_ok)
    tl.store(KV + pid_bh * M * DV + offs_f[:, None] * DV + offs_dv[None, :], kv, mask=kv_mask)


@triton.jit
def sparse_lowrank_fwd_kernel(
    Q, K, V, W, KV, Z, G, Q_INDEX, K_INDEX, KEY_VALID, Q_BUCKET, K_BUCKET,
    OUT, NUM, DEN, STAB,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_wm,
    stride_qib, stride_qih, stride_qit,
    stride_kib, stride_kih, stride_kit,
    stride_qbb, stride_qbh, stride_qbr,
    stride_kbb, stride_kbh, stride_kbr,
    stride_valid_b,
    stride_nb, stride_nh, stride_nn,
    stride_sb, stride_sh,
    H, GROUP, N, S, M, D, DV, TQ, TK, ROUND, BAND, tau, sqrt_tau, inv_m,
    HAS_FEATURES: tl.constexpr, ADD_LOW_RANK: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_BAND: tl.constexpr, DEDUP: tl.constexpr, WRITE_OUT: tl.constexpr, LOW_RANK_IN_CHUNK: tl.constexpr,
    PREC: tl.constexpr, FP32_PREC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_t, q0 = tile_and_first_row(TQ, BLOCK_Q)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    b64 = b.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    qi, q_ok, q = load_query_tile(Q_INDEX + b64 * stride_qib + h.to(tl.int64) * stride_qih + pid_t * stride_qit + q0, TQ - q0, N,
                                  Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, stride_qn, D,
                                  BLOCK_Q, BLOCK_D)
    qf = q.to(tl.float32)
    q_sq_half = tl.sum(qf * qf, 1) * (0.5 * tau)
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    state = (b * (H // GROUP) + hkv).to(tl.int64)

    # Row stabiliser from the low-rank term, r_i = max_f (l(q_i)_f + g_f), found in the same pass
    # over the features that adds phi_i . KV and phi_i . z (rescaled online as r_i grows), unless
    # the last key chunk adds them (LOW_RANK_IN_CHUNK).
    row_lr = tl.full((BLOCK_Q,), NEG, tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)
    den = tl.zeros((BLOCK_Q,), tl.float32)
    if HAS_FEATURES:
        for f0 in range(0, M, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            f_ok = offs_f < M
            g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
            lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC) + g[None, :]
            new_lr = tl.maximum(row_lr, tl.max(lq, 1))
            if ADD_LOW_RANK and not LOW_RANK_IN_CHUNK:
                alpha = tl.exp(row_lr - new_lr)
                phi_q = tl.exp(lq - new_lr[:, None]) * inv_m
                kv = tl.load(KV + state * M * DV + offs_f[:, None] * DV + offs_dv[None, :],
                             mask=f_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                z = tl.load(Z + state * M + offs_f, mask=f_ok, other=0.0)
                acc = tl.dot(phi_q, kv, acc * alpha[:, None], input_precision=FP32_PREC)
                den = den * alpha + tl.sum(phi_q * z[None, :], 1)
            row_lr = new_lr
    row = row_lr

    for k0 in range(0, TK, BLOCK_K):
        kj, k_ok, k, v = load_key_chunk(
            K_INDEX + b64 * stride_kib + hkv.to(tl.int64) * stride_kih + pid_t * stride_kit, k0, TK, S,
            KEY_VALID + b * stride_valid_b, k_base, v_base, stride_kn, stride_vn, D, DV,
            HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
        pair = support_mask(
            qi, q_ok, kj, k_ok, Q_BUCKET + b64 * stride_qbb + h.to(tl.int64) * stride_qbh,
            K_BUCKET + b64 * stride_kbb + hkv.to(tl.int64) * stride_kbh, stride_qbr, stride_kbr, ROUND, BAND,
            HAS_BAND, DEDUP)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * tau
        s = tl.where(pair, s, NEG)
        new_row = tl.maximum(row, tl.max(s, 1))
        alpha = tl.exp(row - new_row)
        acc = acc * alpha[:, None]
        den = den * alpha
        # corr = exp(s - r) - phi_q . phi_k on the support, accumulated in place by the feature dots
        # (phi_q already carries exp(-r) / m) so that one (BLOCK_Q, BLOCK_K) tile stays live.
        corr = tl.where(pair, tl.exp(s - new_row[:, None]), 0.0)
        if HAS_FEATURES:
            kf = k.to(tl.float32)
            k_sq_half = tl.sum(kf * kf, 1) * (0.5 * tau)
            for f0 in range(0, M, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F)
                g = tl.load(G + state * M + offs_f, mask=offs_f < M, other=0.0)
                lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
                lk = feature_logits(k, k_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC)
                phi_q = tl.exp(lq + g[None, :] - new_row[:, None]) * inv_m
                phi_k = tl.exp(tl.where(k_ok[:, None], lk - g[None, :], NEG))  # padding keys: k = 0
                # phi_q . phi_k nearly cancels exp(s - r) and phi_q . KV where the support holds most
                # of the row's mass: fp16 operands for 16-bit inputs (11 significant bits, bf16 has
                # 8; phi_q <= 1/m and phi_k <= 1 fit), fp32 KV (which can pass fp16's range) on TF32
                if q.dtype == tl.float32:
                    corr = tl.dot(-phi_q, tl.trans(phi_k), corr, input_precision=PREC)
                else:
                    corr = tl.dot((-phi_q).to(tl.float16), tl.trans(phi_k.to(tl.float16)), corr)
                if LOW_RANK_IN_CHUNK:
                    if k0 + BLOCK_K >= TK:  # once, in the last chunk (r_i final: no rescaling after)
                        kv = tl.load(KV + state * M * DV + offs_f[:, None] * DV + offs_dv[None, :],
                                     mask=(offs_f[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
                        z = tl.load(Z + state * M + offs_f, mask=offs_f < M, other=0.0)
                        acc = tl.dot(phi_q, kv, acc, input_precision=FP32_PREC)
                        den += tl.sum(phi_q * z[None, :], 1)
            corr = tl.where(pair, corr, 0.0)
            acc = split_dot(corr, v, acc, PREC)  # corr . v nearly cancels phi_q . KV there too
        else:
            acc = tl.dot(corr.to(v.dtype), v, acc, input_precision=PREC)
        den += tl.sum(corr, 1)
        row = new_row

    if WRITE_OUT:
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + qi[:, None].to(tl.int64) * stride_on
                 + offs_dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=q_ok[:, None] & (offs_dv[None, :] < DV))
    else:
        tl.store(NUM + b64 * stride_nb + h.to(tl.int64) * stride_nh + qi[:, None].to(tl.int64) * stride_nn
                 + offs_dv[None, :], acc, mask=q_ok[:, None] & (offs_dv[None, :] < DV))
    stat = b64 * stride_sb + h.to(tl.int64) * stride_sh + qi
    tl.store(DEN + stat, den, mask=q_ok)
    tl.store(STAB + stat, row, mask=q_ok)


@triton.jit
def full_tile_fwd_kernel(
    Q, K, V, W, KV, Z, G, Q_INDEX, K_INDEX, KEY_VALID, OUT, DEN, STAB,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_wm,
    stride_qib, stride_qih, stride_qit,
    stride_kib, stride_kih, stride_kit,
    stride_valid_b,
    stride_sb, stride_sh,
    H, GROUP, N, S, M, D, DV, TQ, TK, tau, sqrt_tau, inv_m,
    HAS_VALID: tl.constexpr, PREC: tl.constexpr, FP32_PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One round whose support is every (real) pair of each tile (one LSH round): the correction
    sum_j C_ij v_j = sum_j exp(s_ij - r_i) v_j - phi_i . VKt factorises over the tile's key state
    VKt (`outside_key_state`), so
        num_i = sum_{j in tile} exp(s_ij - r_i) v_j + phi_i . (KV - VKt),
        den_i = sum_{j in tile} exp(s_ij - r_i) + phi_i . (z - kt_sum):
    exact attention inside the tile plus the low-rank term of the keys outside it, with no
    (queries x keys) x features product. Two passes, r_i growing online through both (flash style):
    feature block by feature block, VKt over the key list and phi_i; then the tile's keys. Writes O,
    den and r like `sparse_lowrank_fwd_kernel` with one round."""
    pid_t, q0 = tile_and_first_row(TQ, BLOCK_Q)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    b64 = b.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    qi, q_ok, q = load_query_tile(Q_INDEX + b64 * stride_qib + h.to(tl.int64) * stride_qih + pid_t * stride_qit + q0, TQ - q0, N,
                                  Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, stride_qn, D,
                                  BLOCK_Q, BLOCK_D)
    qf = q.to(tl.float32)
    q_sq_half = tl.sum(qf * qf, 1) * (0.5 * tau)
    k_list = K_INDEX + b64 * stride_kib + hkv.to(tl.int64) * stride_kih + pid_t * stride_kit
    valid_row = KEY_VALID + b * stride_valid_b
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    state = (b * (H // GROUP) + hkv).to(tl.int64)

    # The low-rank part of the keys outside the tile, feature block by feature block, then the
    # tile's keys exactly; r_i grows online through both passes (flash style), so no pass of its own.
    row = tl.full((BLOCK_Q,), NEG, tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)
    den = tl.zeros((BLOCK_Q,), tl.float32)
    for f0 in range(0, M, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < M
        kv, z = outside_key_state(k_list, TK, S, valid_row, k_base, v_base, stride_kn, stride_vn, W,
                                  KV + state * M * DV, Z + state * M, G + state * M, f0, M, D, DV, stride_wm,
                                  tau, sqrt_tau, HAS_VALID, PREC, BLOCK_K, BLOCK_F, BLOCK_D, BLOCK_DV)
        g = tl.load(G + state * M + offs_f, mask=f_ok, other=0.0)
        lq = feature_logits(q, q_sq_half, W, f0, M, D, stride_wm, sqrt_tau, BLOCK_F, BLOCK_D, PREC) + g[None, :]
        new_row = tl.maximum(row, tl.max(lq, 1))
        alpha = tl.exp(row - new_row)
        phi_q = tl.exp(lq - new_row[:, None]) * inv_m
        if q.dtype == tl.bfloat16:  # |KV| <= S max|v| fits bf16 (not fp16)
            acc = tl.dot(phi_q.to(q.dtype), kv.to(q.dtype), acc * alpha[:, None], input_precision=PREC)
        else:
            acc = tl.dot(phi_q, kv, acc * alpha[:, None], input_precision=FP32_PREC)
        den = den * alpha + tl.sum(phi_q * z[None, :], 1)
        row = new_row

    for k0 in range(0, TK, BLOCK_K):
        kj, k_ok, k, v = load_key_chunk(k_list, k0, TK, S, valid_row, k_base, v_base, stride_kn, stride_vn,
                                        D, DV, HAS_VALID, BLOCK_K, BLOCK_D, BLOCK_DV)
        pair = q_ok[:, None] & k_ok[None, :]
        s = tl.where(pair, tl.dot(q, tl.trans(k), input_precision=PREC) * tau, NEG)
        new_row = tl.maximum(row, tl.max(s, 1))
        alpha = tl.exp(row - new_row)
        exact = tl.where(pair, tl.exp(s - new_row[:, None]), 0.0)
        acc = tl.dot(exact.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        den = den * alpha + tl.sum(exact, 1)
        row = new_row

    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + qi[:, None].to(tl.int64) * stride_on
             + offs_dv[None, :], out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & (offs_dv[None, :] < DV))
    stat = b64 * stride_sb + h.to(tl.int64) * stride_sh + qi
    tl.store(DEN + stat, den, mask=q_ok)
    tl.store(STAB + stat, row, mask=q_ok)


# ----------------------------------------------------------------------------- launchers

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from .host import cdiv, next_power_of_2  # noqa: E402


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(int(x)))


def launch_config(kind: str, tq: int, tk: int, dim: int, v_dim: int,
                  prec: str = "tf32", fp32_operands: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_K, BLOCK_F, num_warps) of the sparse + low-rank kernels, kind 'forward',
    'backward_dq' or 'backward_dkdv' (per-pair kernels), or the same with a 'full_' prefix
    (full-tile kernels), for query tiles of tq rows and key lists of tk keys; prec is
    the dots' precision (`precisions`): 'ieee' (fp32 inputs without TF32) has no tensor cores and
    takes small tiles. For the dk/dv kernels, BLOCK_K is the keys per program and BLOCK_Q the
    query chunk of their inner loops.

    Chosen without a GPU, from the registers and spill stack of every configuration compiled for
    sm_90 with the JIT's argument specialisation (bench/kernel_resources.py,
    bench/results/kernel_resources_triton3.6.0.md): the fewest spills, then the larger tiles.
    Forward: key chunks of 64, features in blocks of 32 (16 beyond head dim 64), no spills at D = 64
    or 128; for buckets of 128 that is 896 exps and 128k multiply-adds per query, the same as one
    chunk of 128 keys with 64 query rows (a whole bucket with 128 rows would save a third of the
    exps but spills 24 B on triton 3.6).
    Backward, D <= 64: dq over key chunks of 64 (128 rows, 32 features); dk/dv for a whole bucket
    of 128 keys over query chunks of 64 (16 features). Both spill-free on triton 3.6 (dk/dv: 24 B on
    3.9), all their dots warpgroup MMAs; 328k multiply-adds and 1.8k exps per query for buckets of
    128 and 256 features. Larger blocks spill (dq with one 128-key chunk: 200-300 B; dk/dv with one
    128-query chunk: 440 B). Beyond D = 64: dq 32 x 64 (88-96 B, the least of those tried), dk/dv 32
    keys over 64-query chunks (none, but mostly warp-level MMAs). To be confirmed on a GPU with
    bench/kernel_configs.py.
    Full-tile kernels (one LSH round, head dims <= 64; their counts do not depend on the key chunk
    or, for dk/dv, the query chunk, only on the rows per program, which rebuild the tile's state):
    forward 128 rows with key chunks of 64 and 64 features (every dot a warpgroup MMA), dq the same
    with 32 features (64 spill 80-96 B), dk/dv 128 keys with query chunks of 32; all spill-free on
    triton 3.6 and 3.9 with 16-bit inputs. IEEE fp32: 64 rows x 16 (forward spill-free,
    dq 16 B), dk/dv 64 keys x 16 queries (16-24 B).
    fp32 inputs on TF32 tensor cores (fp32_operands) hold twice the bytes per tile: the per-pair
    forward keeps its 16-bit blocks (no spills), the others take smaller ones at D = 64 (triton
    3.6): full-tile forward and dq 64 x 64 with 16 features (none), full-tile dk/dv 64 keys over
    16-query chunks with 8 warps (none; each 128-key tile's query state is built twice, where 128
    keys spill 32-104 B), per-pair dk/dv 128 keys over 16-query chunks (none), per-pair dq 32 x 64
    (40 B; 200-340 B on the 16-bit blocks).
    IEEE fp32 dots (FMA, no tensor cores) spill at every size tried; the least: 32 x 32 tiles
    forward (536 B at D = 64, against 9 KB with the bf16 default), dq 64 x 16 with 8 warps (16 B),
    dk/dv 16 keys x 32 queries (32 B).
    """
    wide = max(dim, v_dim) > 64
    block_q = min(_pow2(tq), 128)
    if prec == "ieee":
        if kind == "forward":
            return min(block_q, 32), min(_pow2(tk), 32), 16, 4
        if kind in ("full_forward", "full_backward_dq"):
            return min(block_q, 64), 16, 16, 8 if block_q >= 64 else 4
        if kind == "full_backward_dkdv":
            block_k = min(_pow2(tk), 64)
            return 16, block_k, 16, 8 if block_k >= 64 else 4
        if kind == "backward_dq":
            return min(block_q, 64), 16, 16, 8 if block_q >= 64 else 4
        return min(block_q, 32), 16, 16, 4
    if fp32_operands and kind != "forward":  # TF32: fp32 tiles take twice the registers
        if kind in ("full_forward", "full_backward_dq"):
            return min(block_q, 64), min(_pow2(tk), 64), 16, 4
        if kind == "backward_dq":
            return min(block_q, 32), min(_pow2(tk), 64), 16, 4
        if kind == "full_backward_dkdv":
            return 16, min(_pow2(tk), 64), 16, 8
        block_k = min(_pow2(tk), 128)  # the per-pair dk/dv kernel
        return 16, block_k, 16, 8 if block_k >= 128 else 4
    if kind == "forward":
        block_k, block_f = min(_pow2(tk), 64), 16 if wide else 32
        warps = 8 if block_q * block_k >= 64 * 64 else 4
    elif kind == "backward_dq":
        if wide:
            block_q, block_k, block_f = min(block_q, 32), min(_pow2(tk), 64), 16
        else:
            block_k, block_f = min(_pow2(tk), 64), 32
        warps = 8 if block_q >= 128 else 4  # 64 rows on 8 warps spill (local windows: 24 B)
    elif kind in ("full_forward", "full_backward_dq"):  # (head dims <= 64: `KernelTiles.full_tiles`)
        block_k, block_f = min(_pow2(tk), 64), 64 if kind == "full_forward" else 32
        warps = 8 if block_q >= 128 else 4
    elif kind == "full_backward_dkdv":
        block_q, block_k, block_f = min(block_q, 32), min(_pow2(tk), 128), 32
        warps = 8 if block_k >= 128 else 4
    else:  # backward_dkdv: BLOCK_K keys of a tile per program, its queries in chunks of BLOCK_Q
        if wide:
            block_q, block_k, block_f = min(block_q, 64), min(_pow2(tk), 32), 16
        else:
            block_q, block_k, block_f = min(block_q, 64), min(_pow2(tk), 128), 16
        warps = 8 if block_q * block_k >= 32 * 64 else 4
    return block_q, block_k, block_f, warps


def precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(PREC, FP32_PREC) of the dots. fp32 inputs follow torch's matmul setting: TF32 tensor cores
    when `torch.backends.cuda.matmul.allow_tf32` is set, IEEE fp32 otherwise (exact, but without
    tensor cores: slow). 16-bit inputs: their own dtype on tensor cores, TF32 for the fp32 state."""
    if dtype == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return prec, prec
    return "tf32", "tf32"


def state_blocks(prec: str) -> tuple[int, int]:
    """(rows, features) per step of the state kernels (key state here; query state and per-key
    low-rank backward in scatterbrain_bwd, which take 32 features where 64 spills). On tensor
    cores (64, 64): the (features, rows) x (rows, Dv) products are then warpgroup MMAs (HGMMA; 32
    rows fall back to HMMA), without spills in bf16 at D = 64 (key state: also 128). IEEE fp32
    dots have no tensor cores (FMA) and spill 0.4-13 KB per thread on those blocks: (32, 16), no
    spills at D = 64, 340-630 B at 128."""
    return (32, 16) if prec == "ieee" else (64, 64)


def key_state(k, v, w, key_valid, sqrt_tau, *, split=False, block_s=None, block_f=None, keys_per_split=1024):
    """KV (B*Hkv, m, Dv), z (B*Hkv, m), g (B*Hkv, m), all fp32: the stabilised key-side state.

    k (B, Hkv, S, D), v (B, Hkv, S, Dv) contiguous in the last dim; w (m, D) in k's dtype;
    key_valid (B, S) int8/bool or None. g_f is the max over real keys of l(k)_f (0 if none).
    split: Kt as hi + lo operands of 16-bit dots (`split_dot`; one more dot per step), for the
    per-pair kernels (`per_pair_plan`), whose corrections nearly cancel phi_q . KV where the support
    holds most of a row's low-rank mass; else Kt rounded to v's dtype.
    block_s, block_f: keys per step and features per program (None: `state_blocks`).
    """
    batch, kv_heads, n_k, dim = k.shape
    v_dim = v.shape[-1]
    m = w.shape[0]
    prec, _ = precisions(k.dtype)
    block_s, block_f = (given or default for given, default in zip((block_s, block_f), state_blocks(prec)))
    keys_per_split = max(block_s, min(keys_per_split, next_power_of_2(n_k)))
    keys_per_split = math.ceil(keys_per_split / block_s) * block_s
    n_splits = math.ceil(n_k / keys_per_split)
    bh = batch * kv_heads
    kv_part = torch.empty(bh, n_splits, m, v_dim, device=k.device, dtype=torch.float32)
    z_part = torch.empty(bh, n_splits, m, device=k.device, dtype=torch.float32)
    max_part = torch.empty(bh, n_splits, m, device=k.device, dtype=torch.float32)
    valid = key_valid.contiguous() if key_valid is not None else k  # dummy pointer when absent
    grid = (n_splits, cdiv(m, block_f), bh)
    key_state_kernel[grid](
        k, v, w, valid, kv_part, z_part, max_part,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        w.stride(0), valid.stride(0) if key_valid is not None else 0,
        kv_heads, n_k, m, dim, v_dim, keys_per_split, sqrt_tau,
        HAS_VALID=key_valid is not None, SPLIT=split, PREC=prec,
        BLOCK_S=block_s, BLOCK_F=block_f, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim),
    )
    if n_splits == 1:  # (N <= keys_per_split) the kernel wrote the final state
        return kv_part[:, 0], z_part[:, 0], max_part[:, 0]
    kv, z, g = torch.empty_like(kv_part[:, 0]), torch.empty_like(z_part[:, 0]), torch.empty_like(z_part[:, 0])
    combine_key_state_kernel[(bh, cdiv(m, block_f))](
        kv_part, z_part, max_part, kv, z, g, n_splits, m, v_dim, BLOCK_F=block_f, BLOCK_DV=_pow2(v_dim))
    return kv, z, g


def full_tile_support(n_rounds: int, has_band: bool, tk: int, has_features: bool, dim: int, v_dim: int) -> bool:
    """`KernelTiles.full_tiles` from a plan's round count, band and keys per tile."""
    return has_features and n_rounds == 1 and not has_band and tk > 0 and max(dim, v_dim) <= 64


def per_pair_plan(plan, has_features: bool, dim: int, v_dim: int) -> bool:
    """Whether a low-rank term and a SparsePlan run the per-pair kernels (not the full-tile ones):
    their low-rank states are then formed with hi + lo operands (`key_state`'s split)."""
    return (has_features and plan is not None
            and not full_tile_support(plan.n_rounds, plan.band is not None, plan.k_index.shape[-1], True, dim, v_dim))


@dataclass
class KernelTiles:
    """A SparsePlan laid out for the kernels: index lists expanded over batch and heads (views).

    The kernels read the plan's int64 (or int32) lists as they are, through their strides: only
    the last dimension must have unit stride, so a plan costs no device copies here. Without a
    plan (low-rank only) the tiles are contiguous blocks of 64 queries with no keys.
    """

    q_index: torch.Tensor  # (B, H, R, T, tq) int64 or int32
    k_index: torch.Tensor  # (B, Hkv, R, T, tk)
    q_bucket: torch.Tensor  # (B, H, R, N), or q_index as an unused pointer
    k_bucket: torch.Tensor
    band: int
    has_band: bool
    dedup: bool

    @property
    def n_rounds(self):
        return self.q_index.shape[2]

    @property
    def n_tiles(self):
        return self.q_index.shape[3]

    @property
    def tq(self):
        return self.q_index.shape[4]

    @property
    def tk(self):
        return self.k_index.shape[4]

    def full_tiles(self, has_features: bool, dim: int, v_dim: int) -> bool:
        """Whether the full-tile kernels run: every real (query, key) pair of every tile is in the
        support (one round, no band, some keys), so the correction factorises over each tile's key
        (and, backward, query) state, and there is a low-rank term to factorise. Only with head
        dims <= 64: beyond that the full-tile kernels fit their registers only with blocks of 32
        rows, whose programs each rebuild the tile's state (4x per tile of 128), and the per-pair
        kernels count fewer multiply-adds. (IEEE fp32, with 64-row programs, counts about the same
        either way.)"""
        return full_tile_support(self.n_rounds, self.has_band, self.tk, has_features, dim, v_dim)

    @classmethod
    def from_plan(cls, plan, batch, heads, kv_heads, n_q, device, low_rank_block=64):
        if plan is None:
            n_tiles = math.ceil(n_q / low_rank_block)
            pos = torch.arange(n_tiles * low_rank_block, device=device)
            q_index = torch.where(pos < n_q, pos, n_q).reshape(1, 1, 1, n_tiles, low_rank_block)
            k_index = torch.zeros(1, 1, 1, n_tiles, 0, dtype=torch.long, device=device)
            band, q_bucket, k_bucket = None, None, None
        else:
            q_index, k_index = plan.q_index, plan.k_index
            band, q_bucket, k_bucket = plan.band, plan.q_bucket, plan.k_bucket
        q_index = _index_operand(q_index, device).expand(batch, heads, -1, -1, -1)
        k_index = _index_operand(k_index, device).expand(batch, kv_heads, -1, -1, -1)
        dedup = q_bucket is not None and q_index.shape[2] > 1
        if dedup:
            q_bucket, k_bucket = _index_operand(q_bucket, device), _index_operand(k_bucket, device)
        else:
            q_bucket = k_bucket = q_index
        return cls(q_index, k_index, q_bucket, k_bucket, band or 0, band is not None, dedup)


def _index_operand(index: torch.Tensor, device) -> torch.Tensor:
    """An index tensor as the kernels read it: int32 or int64 on `device`, unit stride along its
    last dimension (a view when it already is)."""
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"plan index tensors must be int32 or int64, got {index.dtype}")
    index = index.to(device=device)
    return index if index.stride(-1) == 1 or index.shape[-1] <= 1 else index.contiguous()


def sparse_lowrank_forward(q, k, v, w, state, plan, *, tau, key_valid, out_dtype,
                           block_q=None, block_k=None, block_f=None, num_warps=None):
    """Scatterbrain forward for a non-causal plan. Returns (out (B, H, N, Dv), den (B, H, N),
    stab (B, H, N)) with den and stab the per-row statistics of the combined rounds:
    O_i = num_i / den_i with every term of row i scaled by exp(-stab_i).

    q (B, H, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); w (m, D) in q's dtype or None;
    state = key_state(...) or None; plan: scatterattn.sparsity.SparsePlan or None (no support).
    block_q, block_k, block_f, num_warps: the launch (None: `launch_config`).
    """
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    device = q.device
    has_features = w is not None
    tiles = KernelTiles.from_plan(plan, batch, heads, kv_heads, n_q, device)
    n_rounds, n_tiles, tq, tk = tiles.n_rounds, tiles.n_tiles, tiles.tq, tiles.tk
    q_index, k_index, q_bucket, k_bucket = tiles.q_index, tiles.k_index, tiles.q_bucket, tiles.k_bucket
    valid = key_valid.contiguous() if key_valid is not None else q_index  # (bool or int8: Triton loads *i1 as bytes)
    kv, z, g = state if has_features else (q, q, q)
    w_arg = w if has_features else q
    m = w.shape[0] if has_features else 0
    prec, fp32_prec = precisions(q.dtype)
    full_tiles = tiles.full_tiles(has_features, dim, v_dim)
    default = launch_config("full_forward" if full_tiles else "forward", tq, tk, dim, v_dim, prec,
                            fp32_operands=q.dtype == torch.float32)
    block_q, block_k, block_f, num_warps = (
        given or fallback for given, fallback in zip((block_q, block_k, block_f, num_warps), default))
    out = torch.empty(batch, heads, n_q, v_dim, device=device, dtype=out_dtype)
    if full_tiles:
        den = torch.empty(batch, heads, n_q, device=device, dtype=torch.float32)
        stab = torch.empty_like(den)
        qi, kj = q_index[:, :, 0], k_index[:, :, 0]
        full_tile_fwd_kernel[(n_tiles * cdiv(tq, block_q), batch * heads)](
            q, k, v, w_arg, kv, z, g, qi, kj, valid, out, den, stab,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            w_arg.stride(0),
            qi.stride(0), qi.stride(1), qi.stride(2),
            kj.stride(0), kj.stride(1), kj.stride(2),
            valid.stride(0),
            den.stride(0), den.stride(1),
            heads, heads // kv_heads, n_q, n_k, m, dim, v_dim, tq, tk, tau, math.sqrt(tau), 1.0 / m,
            HAS_VALID=key_valid is not None, PREC=prec, FP32_PREC=fp32_prec,
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_F=block_f,
            BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim), num_warps=num_warps,
        )
        return out, den, stab
    write_out = n_rounds == 1
    if write_out:
        num = out
        den = torch.empty(batch, heads, n_q, device=device, dtype=torch.float32)
        stab = torch.empty_like(den)
    else:
        num = torch.empty(n_rounds, batch, heads, n_q, v_dim, device=device, dtype=torch.float32)
        den = torch.empty(n_rounds, batch, heads, n_q, device=device, dtype=torch.float32)
        stab = torch.empty_like(den)
    for r in range(n_rounds):
        qi, kj = q_index[:, :, r], k_index[:, :, r]
        num_r = num if write_out else num[r]
        den_r = den if write_out else den[r]
        stab_r = stab if write_out else stab[r]
        sparse_lowrank_fwd_kernel[(n_tiles * cdiv(tq, block_q), batch * heads)](
            q, k, v, w_arg, kv, z, g, qi, kj, valid, q_bucket, k_bucket,
            out, num_r, den_r, stab_r,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            w_arg.stride(0),
            qi.stride(0), qi.stride(1), qi.stride(2),
            kj.stride(0), kj.stride(1), kj.stride(2),
            q_bucket.stride(0), q_bucket.stride(1), q_bucket.stride(2),
            k_bucket.stride(0), k_bucket.stride(1), k_bucket.stride(2),
            valid.stride(0),
            num_r.stride(0), num_r.stride(1), num_r.stride(2),
            den_r.stride(0), den_r.stride(1),
            heads, heads // kv_heads, n_q, n_k, m, dim, v_dim, tq, tk, r,
            tiles.band, tau, math.sqrt(tau), 1.0 / max(m, 1),
            HAS_FEATURES=has_features, ADD_LOW_RANK=has_features and r == 0,
            HAS_VALID=key_valid is not None, HAS_BAND=tiles.has_band, DEDUP=tiles.dedup and r > 0,
            WRITE_OUT=write_out, LOW_RANK_IN_CHUNK=has_features and r == 0 and tk > 0,
            PREC=prec, FP32_PREC=fp32_prec,
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_F=block_f,
            BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(v_dim), num_warps=num_warps,
        )
    if write_out:
        return out, den, stab
    return combine_rounds(num, den, stab, out)


def combine_rounds(num, den, stab, out):
    """Merge per-round (num, den, stab) (R, B, H, N[, Dv]) into out; returns (out, den, stab)."""
    top = stab.amax(0)
    weight = torch.exp(stab - top)
    den_all = (den * weight).sum(0)
    num_all = (num * weight.unsqueeze(-1)).sum(0)
    safe = torch.where(den_all > 0, den_all, torch.ones_like(den_all))
    out.copy_(num_all / safe.unsqueeze(-1))
    return out, den_all, top
