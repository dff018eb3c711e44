"""Exact model, approximate gradient: chained low-rank attention backward (Hu et al., ICLR 2025).

The forward is exact softmax attention (torch SDPA, key padding as a mask). The backward
replaces the attention matrix f = P by a rank-m factorisation f~ = U1 V1^T and chains it through
dS = f * (dO V^T) - diag(rho) f without forming any N x S matrix (shared/docs/lora-chained-gradient.md):

    O~ = U1 (V1^T V),  rho~_i = dO_i . O~_i
    dQ = tau [ (U1 (x) dO) ((V1 (x) V)^T K) - diag(rho~) U1 (V1^T K) ]
    dK = tau [ (V1 (x) V) ((U1 (x) dO)^T Q) - V1 (U1^T diag(rho~) Q) ]
    dV = V1 (U1^T dO)

with (x) the row-wise Kronecker product; the (m Dv) x D middle factors are small, the N x (m Dv)
Kronecker rows are never stored (rows are processed in blocks). Factors: U1 = D~^-1 phi(Q~),
V1 = phi(K~) (FAVOR+ positive random features, stabilised; rows of f~ sum to 1, so rows of the
approximate dS sum to 0). Cost O(N m D Dv). Causal masking uses prefix / suffix sums over chunks.

This is *not* autograd through a Scatterbrain forward (`scatterbrain_attention`), which is the exact
gradient of an approximate model. Here the weights see an approximate gradient of the true loss.

When logits are large the random-feature factorisation fails (the "phase transition"): per
(batch, key/value head group) the backward measures the logit bound tau * max|q| * max|k| and, above
`threshold`, computes that group's gradient exactly instead, counting it in `ChainedGradientStats`.
"""

from __future__ import annotations

import collections
import math
import numbers
from dataclasses import dataclass, field

import torch

from . import reference, triton_backend
from .config import ScatterbrainConfig
from .features import effective_feature_matrix, make_generator
from .functional import (
    _AUTOCAST_DEVICE_TYPES,
    attends_nothing,
    default_scale,
    draw_random_parameters,
    follows_autocast,
    validate_qkv,
)
from .modules import ScatterbrainAttention
from .sparsity import local_plan, lsh_plan

DEFAULT_THRESHOLD = 2.0  # logit bound: ~20% gradient error at m = 256 (bench/results/phase_transition.md)
ROW_BLOCK = 256  # rows per block when contracting with the (m, Dv, D) middle factors
CAUSAL_CHUNK = 64  # rows per chunk of the causal chain, doubled while there would be more than
MAX_CAUSAL_CHUNKS = 128  # chunks (a Python loop of a few dozen tensor ops per chunk and pass: on a
# GPU launch-bound at 64 rows; the exact intra-chunk part costs O(N chunk m), so chunks stay small)


HISTORY_LENGTH = 10_000


@dataclass
class ChainedGradientStats:
    """Counts of (batch, key/value head) groups whose backward was approximate or fell back to exact."""

    approximate: int = 0
    fallback: int = 0  # all exact groups: above the threshold, or numeric (below)
    numeric: int = 0  # of which: below the threshold, but the factors underflowed
    sparse: int = 0  # of the approximate groups: the sparse-corrected chain (above `threshold`)
    max_logit_bound: float = 0.0
    # per backward: (approximate, fallback); the last HISTORY_LENGTH (a shared stats object sees
    # every attention call of every training step)
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH))

    def record(self, approximate: int, fallback: int, bound: float, numeric: int = 0, sparse: int = 0) -> None:
        self.approximate += approximate
        self.fallback += fallback
        self.numeric += numeric
        self.sparse += sparse
        self.max_logit_bound = max(self.max_logit_bound, bound)
        self.history.append((approximate, fallback))

    @property
    def fallback_fraction(self) -> float:
        total = self.approximate + self.fallback
        return self.fallback / total if total else 0.0

    def reset(self) -> None:
        self.approximate = self.fallback = self.numeric = self.sparse = 0
        self.max_logit_bound = 0.0
        self.history.clear()


GLOBAL_STATS = ChainedGradientStats()


def logit_bound(query: torch.Tensor, key: torch.Tensor, scale: float, key_valid=None) -> torch.Tensor:
    """(B, Hkv): tau * max_i |q_i| * max_j |k_j| over each key/value head's query group, an upper
    bound on |s_ij|. The random-feature variance grows like exp(|q~ + k~|^2) / m, so this is the
    quantity the threshold is applied to."""
    batch = query.shape[0]
    kv_heads = key.shape[1]
    q_norm = query.detach().float().norm(dim=-1).reshape(batch, kv_heads, -1).amax(-1)
    k_norm = key.detach().float().norm(dim=-1)
    if key_valid is not None:
        k_norm = torch.where(key_valid[:, None, :], k_norm, torch.zeros_like(k_norm))
    return scale * q_norm * k_norm.amax(-1)


# ----------------------------------------------------------------------------- factors


def random_feature_factors(q, k, feature_matrix, scale, *, is_causal=False, key_valid=None):
    """U1 (B, Hkv, G, N, m) and V1 (B, Hkv, S, m) with U1 V1^T ~ softmax(tau q k^T) (masked).

    q (B, Hkv, G, N, D), k (B, Hkv, S, D) in the compute dtype. Stabilised as the reference:
    V1 = exp(l(k) - g) with g the per-feature key maximum; U1 = P / D~ with P = exp(l(q) + g - r)
    and D~_i = sum_{j allowed} P_i . V1_j (row sums of the factorised matrix), so U1 V1^T has rows
    summing to one. Constants (g, r) carry no gradient and cancel.

    Also returns `underflow` (B, Hkv, G, N) bool: rows that have allowed keys but whose D~ fell below
    sqrt(finfo.tiny) -- with the global key stabiliser g, causal rows whose visible keys carry
    negligible feature mass compared with later keys. There U1 would be numerically meaningless
    (huge values, inf - inf); the backward computes those groups exactly instead.
    """
    root = math.sqrt(scale)
    lq, v1 = reference.stabilised_features(q * root, k * root, feature_matrix, key_valid)
    p = torch.exp(lq - lq.amax(-1, keepdim=True))
    den = _low_rank_den(p, v1, is_causal).unsqueeze(-1)
    has_keys = _rows_with_keys(q.shape, k.shape[-2], is_causal, key_valid, q.device)
    underflow = has_keys & (den.squeeze(-1) < torch.finfo(den.dtype).tiny ** 0.5)
    u1 = p / torch.where(underflow.unsqueeze(-1), 1.0, reference._safe_den(den))
    return u1, v1, underflow


def _rows_with_keys(q_shape, n_k, is_causal, key_valid, device):
    """(B or 1, 1, 1, N) bool: query rows that see at least one real key."""
    n_q = q_shape[-2]
    if key_valid is None:
        return torch.ones(1, 1, 1, n_q, dtype=torch.bool, device=device)
    if not is_causal:
        return key_valid.any(-1)[:, None, None, None].expand(-1, 1, 1, n_q)
    seen = torch.cumsum(key_valid.long(), dim=-1)  # real keys among 0 .. j
    idx = torch.arange(n_q, device=device).clamp_max(n_k - 1)
    return (seen[:, idx] > 0)[:, None, None, :]


@dataclass
class SparseCorrection:
    """The sparse part of a sparse-corrected factorisation f~ = U1 V1^T + C~ (compute layout).

    tiles: the `reference.SparseTiles` of the support; weights (B, Hkv, G, R, T, tq, tk):
    C~_ij = (exp(s_ij - r_i) - P_i . V1_j) / D~_i on support pairs, 0 elsewhere.
    """

    tiles: reference.SparseTiles
    weights: torch.Tensor


def sparse_corrected_factors(q, k, feature_matrix, scale, plan, *, is_causal=False, key_valid=None):
    """U1, V1 and the sparse correction C~ with f~ = U1 V1^T + C~ = Scatterbrain's attention matrix.

    Shapes as `random_feature_factors`; plan: the `SparsePlan` of these (B, Hkv * G) query heads.
    f~_ij = exp(s_ij) / D~_i on the support (exact) and phi(q~_i) . phi(k~_j) / D~_i elsewhere, with
    D~ its row sums, stabilised as `scatterattn.reference.scatterbrain_reference` (row constant
    r_i = max(feature maximum, support maximum)). Also returns `underflow`, as `random_feature_factors`.
    """
    root = math.sqrt(scale)
    qs, ks = q * root, k * root
    lq, v1 = reference.stabilised_features(qs, ks, feature_matrix, key_valid)
    tiles = reference.SparseTiles(qs, ks, plan, is_causal=is_causal, key_valid=key_valid)
    scores = tiles.scores.masked_fill(~tiles.mask, float("-inf"))
    n_q = q.shape[-2]
    row_max = torch.nn.functional.pad(lq.amax(-1), (0, 1), value=float("-inf"))
    row_max = row_max.scatter_reduce(-1, tiles.q_flat, scores.amax(-1).flatten(3), reduce="amax")
    row_max = reference._finite_or_zero(row_max)  # (B, Hkv, G, N + 1); slot N for empty tile slots
    # feature_logits is log(sqrt(m) phi): P . V1 = m exp(-r) phi(q) . phi(k), hence the 1 / m that
    # puts the low-rank term on the scale of exp(s - r) (it cancels in the plain chain, not here)
    p = torch.exp(lq - row_max[..., :n_q, None]) / feature_matrix.shape[0]
    exact = torch.exp(scores - tiles.take_rows(row_max.unsqueeze(-1)))  # 0 off the support
    low_rank = torch.einsum(
        "bhgrtqm,bhxrtkm->bhgrtqk",
        tiles.take_rows(torch.nn.functional.pad(p, (0, 0, 0, 1))),
        tiles.take_keys(torch.nn.functional.pad(v1, (0, 0, 0, 1))),
    )
    correction = exact - low_rank * tiles.mask
    den = torch.nn.functional.pad(_low_rank_den(p, v1, is_causal), (0, 1))
    den = den.scatter_add(-1, tiles.q_flat, correction.sum(-1).flatten(3))
    has_keys = _rows_with_keys(q.shape, k.shape[-2], is_causal, key_valid, q.device)
    underflow = has_keys & (den[..., :n_q] < torch.finfo(den.dtype).tiny ** 0.5)
    safe = reference._safe_den(den)
    safe[..., :n_q] = torch.where(underflow, 1.0, safe[..., :n_q])
    u1 = p / safe[..., :n_q, None]
    weights = correction / tiles.take_rows(safe.unsqueeze(-1))
    return u1, v1, SparseCorrection(tiles, weights), underflow


def _low_rank_den(p, v1, is_causal):
    """(B, Hkv, G, N): sum over the allowed keys j of P_i . V1_j (prefix sums when causal)."""
    n_q = p.shape[-2]
    if not is_causal:
        return (p @ v1.sum(-2).unsqueeze(2).unsqueeze(-1)).squeeze(-1)
    prefix = torch.cumsum(v1, dim=-2)  # (B, Hkv, S, m): z_i = sum_{j <= i} V1_j
    prefix = torch.nn.functional.pad(prefix, (0, 0, 0, max(0, n_q - prefix.shape[-2])), mode="replicate")
    return (p * prefix[..., :n_q, :].unsqueeze(2)).sum(-1)


def exact_factors(q, k, scale, *, is_causal=False, key_valid=None):
    """U1 = P (the exact attention matrix, (B, Hkv, G, N, S)) and V1 = I (B, Hkv, S, S), zero rows
    for padded keys: with these the chain is the exact backward. O(N S) memory: for checks only."""
    batch, kv_heads, group, n_q, _ = q.shape
    n_k = k.shape[-2]
    eye = torch.eye(n_k, dtype=q.dtype, device=q.device).expand(batch, kv_heads, n_k, n_k)
    p = reference.dense_attention(
        q.reshape(batch, kv_heads * group, n_q, -1), k, eye, scale=scale, is_causal=is_causal, key_valid=key_valid
    ).reshape(batch, kv_heads, group, n_q, n_k)
    if key_valid is not None:
        eye = eye * key_valid[:, None, :, None]
    return p, eye


# ----------------------------------------------------------------------------- the chain


def chained_attention_backward(q, k, v, grad_out, u1, v1, scale, *, is_causal=False, kernel_dtype=None, rho=None):
    """(dq, dk, dv) of attention for f = U1 V1^T (masked causally when is_causal), in O(N m D Dv).

    q (B, Hkv, G, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), grad_out (B, Hkv, G, N, Dv),
    u1 (B, Hkv, G, N, m), v1 (B, Hkv, S, m). Padded keys must have V1 rows of zero. With exact
    factors (U1 = P, V1 = I) this is the exact attention backward. kernel_dtype: None computes the
    two Kronecker products with torch einsums; a dtype, with the Triton kernels of
    scatterattn.kernels.chained_grad using dot operands of that dtype (fp32 accumulation).
    rho (B, Hkv, G, N, 1): dO_i . O~_i when f~ has more than this low-rank part (the sparse
    correction); by default computed from O~ = U1 V1^T V.
    """
    gram, rows = _kron_ops(kernel_dtype)
    if is_causal:
        return _chain_causal(q, k, v, grad_out, u1, v1, scale, gram=gram, rows=rows, rho=rho)
    if rho is None:
        o_tilde = u1 @ (v1.transpose(-1, -2) @ v).unsqueeze(2)
        rho = (grad_out * o_tilde).sum(-1, keepdim=True)
    # each factor enters two Kronecker products: cast it to the kernels' operand dtype once
    u1_op, v1_op = (u1, v1) if kernel_dtype is None else (u1.to(kernel_dtype), v1.to(kernel_dtype))
    m1 = gram(v1_op, v, k)  # (V1 (x) V)^T K: (B, Hkv, m, Dv, D)
    v1k = (v1.transpose(-1, -2) @ k).unsqueeze(2)  # V1^T K: (m, D)
    dq = scale * (rows(u1_op, grad_out, m1.unsqueeze(2)) - rho * (u1 @ v1k))
    m2 = gram(*(x.flatten(2, 3) for x in (u1_op, grad_out, q)))  # (U1 (x) dO)^T Q over the group's rows
    dk = rows(v1_op, v, m2)
    u1_rho_q = torch.einsum("bhgna,bhgnd->bhad", u1, rho * q)  # U1^T diag(rho) Q, summed over G
    dk = scale * (dk - v1 @ u1_rho_q)
    dv = v1 @ torch.einsum("bhgna,bhgne->bhae", u1, grad_out)
    return dq, dk, dv


def sparse_corrected_backward(q, k, v, grad_out, u1, v1, correction, scale, *, is_causal=False, kernel_dtype=None):
    """(dq, dk, dv) of attention for f~ = U1 V1^T + C~ (`sparse_corrected_factors`).

    The low-rank part goes through the chain (O(N m D Dv)); the correction adds, on the support only
    (O(nnz D)), dS_ij = C~_ij (dO_i . v_j - rho~_i) to dq, dk and C~_ij dO_i to dv, with
    rho~_i = dO_i . O~_i over the whole f~, so that rows of dS~ still sum to zero.
    """
    tiles, weights = correction.tiles, correction.weights
    n_q, n_k = q.shape[-2], k.shape[-2]

    def rows_of(x):  # (B, Hkv, G, N, F) -> tiles
        return tiles.take_rows(torch.nn.functional.pad(x, (0, 0, 0, 1)))

    def keys_of(x):  # (B, Hkv, S, F) -> tiles
        return tiles.take_keys(torch.nn.functional.pad(x, (0, 0, 0, 1)))

    def add_rows(out_rows, tile_values):  # scatter (B, Hkv, G, R, T, tq, F) into (B, Hkv, G, N, F)
        width = tile_values.shape[-1]
        index = tiles.q_flat.unsqueeze(-1).expand(-1, -1, -1, -1, width)
        padded = torch.nn.functional.pad(out_rows, (0, 0, 0, 1))
        return padded.scatter_add(-2, index, tile_values.flatten(3, 5))[..., :n_q, :]

    def add_keys(out_keys, tile_values):  # scatter (B, Hkv, R, T, tk, F) into (B, Hkv, S, F)
        width = tile_values.shape[-1]
        index = tiles.k_flat.squeeze(2).unsqueeze(-1).expand(-1, -1, -1, width)
        padded = torch.nn.functional.pad(out_keys, (0, 0, 0, 1))
        return padded.scatter_add(-2, index, tile_values.flatten(2, 4))[..., :n_k, :]

    v_tiles, do_tiles = keys_of(v), rows_of(grad_out)
    if is_causal:
        o_low_rank = reference._causal_low_rank(u1, v1, v)[0]
    else:
        o_low_rank = u1 @ (v1.transpose(-1, -2) @ v).unsqueeze(2)
    o_tilde = add_rows(o_low_rank, torch.einsum("bhgrtqk,bhxrtkd->bhgrtqd", weights, v_tiles))
    rho = (grad_out * o_tilde).sum(-1, keepdim=True)
    dq, dk, dv = chained_attention_backward(
        q, k, v, grad_out, u1, v1, scale, is_causal=is_causal, kernel_dtype=kernel_dtype, rho=rho
    )
    d_p = torch.einsum("bhgrtqd,bhxrtkd->bhgrtqk", do_tiles, v_tiles)
    d_s = weights * (d_p - rows_of(rho))
    dq = dq + scale * add_rows(torch.zeros_like(q), torch.einsum("bhgrtqk,bhxrtkd->bhgrtqd", d_s, keys_of(k)))
    dk = dk + scale * add_keys(torch.zeros_like(k), torch.einsum("bhgrtqk,bhgrtqd->bhrtkd", d_s, rows_of(q)))
    dv = dv + add_keys(torch.zeros_like(v), torch.einsum("bhgrtqk,bhgrtqd->bhrtkd", weights, do_tiles))
    return dq, dk, dv


def _kron_ops(kernel_dtype):
    """(gram, rows): the torch versions below (kernel_dtype None), or the Triton kernels with dot
    operands of kernel_dtype (results cast back to the compute dtype, b's: a may already be in
    the operand dtype)."""
    if kernel_dtype is None:
        return _kron_gram, _kron_rows
    from .kernels import chained_grad

    def gram(a, b, c):
        return chained_grad.kron_gram(a, b, c, op_dtype=kernel_dtype).to(b.dtype)

    def rows(a, b, middle):
        return chained_grad.kron_rows(a, b, middle, op_dtype=kernel_dtype).to(b.dtype)

    return gram, rows


def _kron_gram(a, b, c):
    """sum_n (a_n (x) b_n) c_n^T over rows, (..., m, Dv, D), in blocks of rows so that the
    (rows, m, Dv) Kronecker block stays small."""
    total = None
    for r in range(0, a.shape[-2], ROW_BLOCK):
        part = torch.einsum("...na,...ne,...nd->...aed", a[..., r:r + ROW_BLOCK, :], b[..., r:r + ROW_BLOCK, :],
                            c[..., r:r + ROW_BLOCK, :])
        total = part if total is None else total + part
    return total


def _kron_rows(a, b, middle):
    """Rows (a_i (x) b_i) . middle, middle (..., m, Dv, D): sum_{a,e} a_ia b_ie middle[a, e, :], in
    blocks of rows (einsum may form the (rows, m, Dv) Kronecker block)."""
    return torch.cat(
        [torch.einsum("...na,...ne,...aed->...nd", a[..., r:r + ROW_BLOCK, :], b[..., r:r + ROW_BLOCK, :], middle)
         for r in range(0, a.shape[-2], ROW_BLOCK)],
        dim=-2,
    )


def causal_chunk(n: int) -> int:
    """Rows per chunk of the causal chain for sequences of n rows (see MAX_CAUSAL_CHUNKS)."""
    chunk = CAUSAL_CHUNK
    while math.ceil(n / chunk) > MAX_CAUSAL_CHUNKS:
        chunk *= 2
    return chunk


def _chain_causal(q, k, v, grad_out, u1, v1, scale, *, gram=None, rows=None, chunk=None, rho=None):
    """Causal chain (key j visible to query i when j <= i): exact products inside a chunk, running
    prefix states (forward in i) for dq and suffix states (backward in j) for dk, dv. rho: as
    `chained_attention_backward` (None: from the low-rank O~). chunk: default `causal_chunk`; the
    result does not depend on it (up to rounding)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    chunk = chunk or causal_chunk(max(n_q, n_k))
    length = math.ceil(max(n_q, n_k) / chunk) * chunk

    def pad_rows(x, n):
        return torch.nn.functional.pad(x, (0, 0, 0, length - n))

    q_, do_, u1_ = pad_rows(q, n_q), pad_rows(grad_out, n_q), pad_rows(u1, n_q)
    rho_ = None if rho is None else pad_rows(rho, n_q)
    k_, v_, v1_ = pad_rows(k, n_k), pad_rows(v, n_k), pad_rows(v1, n_k)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    batch, kv_heads = q.shape[:2]
    m, dim, v_dim = u1.shape[-1], q.shape[-1], v.shape[-1]
    state_m1 = q.new_zeros(batch, kv_heads, 1, m, v_dim, dim)
    state_v1k = q.new_zeros(batch, kv_heads, 1, m, dim)
    state_v1v = q.new_zeros(batch, kv_heads, 1, m, v_dim)
    dq_chunks, rho_chunks = [], []
    for c0 in range(0, length, chunk):
        sl = slice(c0, c0 + chunk)
        u, do, kc, vc, v1c = u1_[..., sl, :], do_[..., sl, :], k_[..., sl, :], v_[..., sl, :], v1_[..., sl, :]
        f = (u @ v1c.unsqueeze(2).transpose(-1, -2)) * tril  # (B, Hkv, G, L, L)
        if rho_ is None:
            o_tilde = u @ state_v1v + f @ vc.unsqueeze(2)
            rho = (do * o_tilde).sum(-1, keepdim=True)
        else:
            rho = rho_[..., sl, :]
        p = f * (do @ vc.unsqueeze(2).transpose(-1, -2)) - rho * f  # intra-chunk dS
        dq = rows(u, do, state_m1) - rho * (u @ state_v1k) + p @ kc.unsqueeze(2)
        dq_chunks.append(scale * dq)
        rho_chunks.append(rho)
        state_m1 = state_m1 + gram(v1c, vc, kc).unsqueeze(2)
        state_v1k = state_v1k + (v1c.transpose(-1, -2) @ kc).unsqueeze(2)
        state_v1v = state_v1v + (v1c.transpose(-1, -2) @ vc).unsqueeze(2)
    rho_all = torch.cat(rho_chunks, dim=-2)

    state_m2 = q.new_zeros(batch, kv_heads, m, v_dim, dim)
    state_urq = q.new_zeros(batch, kv_heads, m, dim)
    state_udo = q.new_zeros(batch, kv_heads, m, v_dim)
    dk_chunks, dv_chunks = [], []
    for c0 in reversed(range(0, length, chunk)):
        sl = slice(c0, c0 + chunk)
        u, do, qc, rho = u1_[..., sl, :], do_[..., sl, :], q_[..., sl, :], rho_all[..., sl, :]
        kc, vc, v1c = k_[..., sl, :], v_[..., sl, :], v1_[..., sl, :]
        f = (u @ v1c.unsqueeze(2).transpose(-1, -2)) * tril
        p = f * (do @ vc.unsqueeze(2).transpose(-1, -2)) - rho * f
        dk = rows(v1c, vc, state_m2) - v1c @ state_urq + (p.transpose(-1, -2) @ qc).sum(2)
        dv = v1c @ state_udo + (f.transpose(-1, -2) @ do).sum(2)
        dk_chunks.append(scale * dk)
        dv_chunks.append(dv)
        state_m2 = state_m2 + gram(*(x.flatten(2, 3) for x in (u, do, qc)))  # over the group's rows
        state_urq = state_urq + torch.einsum("bhgna,bhgnd->bhad", u, rho * qc)
        state_udo = state_udo + torch.einsum("bhgna,bhgne->bhae", u, do)
    dq = torch.cat(dq_chunks, dim=-2)[..., :n_q, :]
    dk = torch.cat(dk_chunks[::-1], dim=-2)[..., :n_k, :]
    dv = torch.cat(dv_chunks[::-1], dim=-2)[..., :n_k, :]
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd


def exact_attention(query, key, value, *, scale, is_causal, key_valid):
    """Exact softmax attention by SDPA (flash / cuDNN / CPU flash kernels) on any device.

    Key padding goes in as a (B, 1, 1, S) bool mask (broadcast: no N x S tensor), or, when causal
    too, a (B, 1, N, S) bool one. Rows with no visible key (a fully padded batch element, or causal
    rows before the first real key) return zeros, as `reference.dense_attention` does: they attend
    every key inside SDPA (finite, no NaN to leak into gradients) and are zeroed after."""
    gqa = query.shape[1] != key.shape[1]
    if key_valid is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, scale=scale, is_causal=is_causal, enable_gqa=gqa)
    visible = key_valid[:, None, None, :]
    if is_causal:  # top-left aligned, as SDPA's is_causal
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        visible = visible & causal
    has_key = visible.any(-1, keepdim=True)  # (B, 1, 1 or N, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=visible | ~has_key, scale=scale, enable_gqa=gqa)
    return out * has_key


@dataclass(frozen=True)
class ChainSettings:
    """Non-tensor settings of one chained-gradient call (and the LSH projections, which take no
    gradient). sparse: the support of the sparse-corrected chain, or None for no such tier."""

    scale: float
    is_causal: bool
    key_valid: torch.Tensor | None
    threshold: float | None
    sparse_threshold: float | None
    stats: ChainedGradientStats | None
    exact_factors: bool
    kernel_dtype: torch.dtype | None  # dot operands of the Kronecker kernels; None: torch einsums
    sparse: ScatterbrainConfig | None = None
    hash_projections: torch.Tensor | None = None

    def tiers(self, bound: torch.Tensor):
        """(plain, corrected) bool (B, Hkv): groups for the plain chain (bound <= threshold) and for
        the sparse-corrected chain (threshold < bound <= sparse_threshold); the rest is exact."""
        plain = torch.ones_like(bound, dtype=torch.bool) if self.threshold is None else bound <= self.threshold
        corrected = torch.zeros_like(plain)
        if self.sparse is not None:
            corrected = ~plain
            if self.sparse_threshold is not None:
                corrected = corrected & (bound <= self.sparse_threshold)
        return plain, corrected


class ChainedLowRankAttentionFunction(torch.autograd.Function):
    """Exact forward; backward by the chained low-rank approximation, per group in three tiers:
    plain chain, sparse-corrected chain, exact."""

    @staticmethod
    def forward(ctx, query, key, value, feature_matrix, settings: ChainSettings):
        out = exact_attention(query, key, value, scale=settings.scale, is_causal=settings.is_causal,
                              key_valid=settings.key_valid)
        ctx.save_for_backward(query, key, value, feature_matrix)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the graph below would only follow grad_out
            raise RuntimeError("chained_lowrank_attention has no second derivative: its backward cannot run "
                               "with create_graph=True (use exact attention for higher-order gradients)")
        device_type = grad_out.device.type
        if device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):  # a backward called inside autocast
                return ChainedLowRankAttentionFunction._backward(ctx, grad_out)
        return ChainedLowRankAttentionFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        query, key, value, feature_matrix = ctx.saved_tensors
        st: ChainSettings = ctx.settings
        batch, heads, n_q, dim = query.shape
        kv_heads, v_dim = key.shape[1], value.shape[-1]
        group = heads // kv_heads
        bound = logit_bound(query, key, st.scale, st.key_valid)  # (B, Hkv)
        plain, corrected = st.tiers(bound)

        cd = reference.compute_dtype(query.dtype)
        q = query.detach().to(cd).reshape(batch, kv_heads, group, n_q, dim)
        k, v = key.detach().to(cd), value.detach().to(cd)
        do = grad_out.to(cd).reshape(batch, kv_heads, group, n_q, v_dim)
        grads = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
        numeric = torch.zeros_like(plain)
        for tier, method in ((plain, _chain_groups), (corrected, _sparse_chain_groups)):
            _run_groups(tier, method, st, (q, k, v, do), feature_matrix, grads, numeric)
        dq, dk, dv = grads
        dq = dq.reshape(batch, heads, n_q, dim)

        exact_groups = ~(plain | corrected) | numeric
        n_exact, max_bound, n_numeric, n_sparse = torch.stack(  # one host sync
            [exact_groups.sum(), bound.max(), numeric.sum(), (corrected & ~numeric).sum()]
        ).tolist()
        if n_exact:
            n_exact = int(n_exact)
            b_idx, h_idx = exact_groups.nonzero(as_tuple=True)
            head_idx = (h_idx[:, None] * group + torch.arange(group, device=h_idx.device)).reshape(-1)
            b_rep = b_idx.repeat_interleave(group)
            with torch.enable_grad():
                qs = query.detach()[b_rep, head_idx].reshape(n_exact, group, n_q, dim).requires_grad_()
                ks = key.detach()[b_idx, h_idx].unsqueeze(1).requires_grad_()
                vs = value.detach()[b_idx, h_idx].unsqueeze(1).requires_grad_()
                kv_mask = None if st.key_valid is None else st.key_valid[b_idx]
                out = exact_attention(qs, ks, vs, scale=st.scale, is_causal=st.is_causal, key_valid=kv_mask)
                gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), grad_out[b_rep, head_idx].reshape(out.shape))
            dq[b_rep, head_idx] = gq.reshape(-1, n_q, dim).to(dq.dtype)
            dk[b_idx, h_idx] = gk.squeeze(1).to(dk.dtype)
            dv[b_idx, h_idx] = gv.squeeze(1).to(dv.dtype)
        if st.stats is not None:
            st.stats.record(bound.numel() - int(n_exact), int(n_exact), max_bound, numeric=int(n_numeric),
                            sparse=int(n_sparse))
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None


def _run_groups(tier, method, st, tensors, feature_matrix, grads, numeric):
    """Run `method` on the (batch, kv-head) groups selected by `tier` (B, Hkv) and write their
    gradients into grads = [dq, dk, dv] (the list's tensors are replaced when the tier holds every
    group) and their underflow flags into `numeric`, in place."""
    b_c, h_c = tier.nonzero(as_tuple=True)
    if not len(b_c):
        return
    q, k, v, do = tensors
    if len(b_c) == tier.numel():  # every group: no gather, no copy
        results = method(st, q, k, v, do, feature_matrix, st.key_valid)
        grads[:] = results[:3]
        numeric |= results[3]
        return
    kv_sel = None if st.key_valid is None else st.key_valid[b_c]
    results = method(st, *(x[b_c, h_c].unsqueeze(1) for x in tensors), feature_matrix, kv_sel)
    for grad, result in zip(grads, results[:3]):
        grad[b_c, h_c] = result[:, 0]
    numeric[b_c, h_c] = results[3][:, 0]


def _chain_groups(st, q, k, v, do, feature_matrix, key_valid):
    """The plain chain for the given groups (compute layout); also which groups' factors underflowed."""
    if st.exact_factors:
        u1, v1 = exact_factors(q, k, st.scale, is_causal=st.is_causal, key_valid=key_valid)
        numeric = torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
    else:
        u1, v1, underflow = random_feature_factors(
            q, k, feature_matrix, st.scale, is_causal=st.is_causal, key_valid=key_valid
        )
        numeric = underflow.flatten(2).any(-1)
    dq, dk, dv = chained_attention_backward(q, k, v, do, u1, v1, st.scale, is_causal=st.is_causal, kernel_dtype=st.kernel_dtype)
    return dq, dk, dv, numeric


def _sparse_chain_groups(st, q, k, v, do, feature_matrix, key_valid):
    """The sparse-corrected chain for the given groups: build their support, factor, chain."""
    batch, kv_heads, group, n_q, dim = q.shape
    if st.sparse.sparse == "lsh":
        plan = lsh_plan(q.reshape(batch, kv_heads * group, n_q, dim), k, bucket_size=st.sparse.bucket_size,
                        hash_projections=st.hash_projections, key_valid=key_valid)
    else:
        plan = local_plan(n_q, k.shape[-2], window=st.sparse.window, device=q.device)
    u1, v1, correction, underflow = sparse_corrected_factors(
        q, k, feature_matrix, st.scale, plan, is_causal=st.is_causal, key_valid=key_valid
    )
    dq, dk, dv = sparse_corrected_backward(
        q, k, v, do, u1, v1, correction, st.scale, is_causal=st.is_causal, kernel_dtype=st.kernel_dtype
    )
    return dq, dk, dv, underflow.flatten(2).any(-1)


def _check_num_features(num_features) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1 for the chained gradient, got {num_features!r}")


def _check_tiers(threshold, sparse_threshold, sparse: str) -> None:
    """The thresholds of the three tiers (plain chain, sparse-corrected chain, exact), checked
    together so that no setting is silently unused."""
    _check_threshold("threshold", threshold)
    _check_threshold("sparse_threshold", sparse_threshold)
    if sparse_threshold is not None and sparse == "none":
        raise ValueError("sparse_threshold needs a sparse support (sparse='lsh' or 'local')")
    if sparse_threshold is not None and threshold is not None and sparse_threshold < threshold:
        raise ValueError(f"sparse_threshold ({sparse_threshold}) must be >= threshold ({threshold})")
    if sparse != "none" and threshold is None:
        raise ValueError(f"sparse={sparse!r} with threshold=None: every group would take the plain chain and the "
                         "sparse-corrected tier never run; give a threshold (0 sends every group to it)")


def _check_threshold(name: str, value) -> None:
    if value is not None and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")


@follows_autocast()
def chained_lowrank_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    num_features: int = 256,
    feature_type: str = "positive",
    threshold: float | None = DEFAULT_THRESHOLD,
    sparse: str = "none",
    bucket_size: int = 128,
    n_hashes: int = 1,
    window: int = 128,
    sparse_threshold: float | None = None,
    feature_matrix: torch.Tensor | None = None,
    hash_projections: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stats: ChainedGradientStats | None = GLOBAL_STATS,
    factors: str = "random",
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention forward, chained low-rank (approximate) backward: "exact model, approximate gradient".

    Shapes and masks as `scatterbrain_attention`. Per (batch, key/value head) group the backward
    measures the logit bound tau * max|q| * max|k| and picks one of three tiers:
      * bound <= `threshold` (None: always): the plain chain, rank-m random-feature factors;
      * above it, when `sparse` is 'lsh' or 'local': the sparse-corrected chain, whose attention
        matrix is Scatterbrain's (exact exp(s) on the support: LSH buckets of `bucket_size` keys,
        `n_hashes` rounds, or a local `window`; random features elsewhere), up to `sparse_threshold`
        (None: no limit); threshold=0 sends every group there;
      * otherwise the exact backward.
    Independently, groups whose factor normaliser underflows (causal rows, very large logits) are
    computed exactly. Counted in `stats` (default scatterattn.lora.GLOBAL_STATS): `fallback` exact
    groups, of which `numeric` by underflow; `approximate` chained groups, of which `sparse` corrected.
    `factors="exact"` uses U1 = P, V1 = I (O(N S) memory; the chain is then the exact backward: a
    check of the algebra; its kernels keep fp32 operands). Random parameters as `scatterbrain_attention` (the same seed draws the
    same feature matrix and hash projections). `backend`: 'reference' (torch einsums), 'triton' (the
    Kronecker products as Triton kernels; fp16, bf16, fp32 inputs, CUDA or TRITON_INTERPRET=1; bf16
    tensor-core operands for 16-bit inputs, see scatterattn.kernels.chained_grad) or 'auto' (Triton
    on CUDA, else reference); the sparse correction is torch gathers either way.
    """
    validate_qkv(query, key, value, key_padding_mask, scale)
    kernel_dtype = _kernel_dtype(backend, query, value)
    if factors not in ("random", "exact"):
        raise ValueError(f"factors must be 'random' or 'exact', got {factors!r}")
    if factors == "exact" and kernel_dtype is not None:
        kernel_dtype = torch.float32  # the algebra check stays exact: no bf16 operand rounding
    _check_num_features(num_features)
    config = ScatterbrainConfig(num_features=num_features, feature_type=feature_type, sparse=sparse,
                                bucket_size=bucket_size, n_hashes=n_hashes, window=window)
    _check_tiers(threshold, sparse_threshold, sparse)
    if stats is not None and not isinstance(stats, ChainedGradientStats):
        raise TypeError(f"stats must be a ChainedGradientStats or None, got {type(stats).__name__}")
    if factors == "exact" and sparse != "none":
        raise ValueError("factors='exact' (a check of the algebra) takes no sparse correction; use sparse='none'")
    dim = query.shape[-1]
    if feature_matrix is None or (sparse == "lsh" and hash_projections is None):
        drawn_features, drawn_projections = draw_random_parameters(
            config, dim, generator=generator or make_generator(seed)
        )
        feature_matrix = drawn_features if feature_matrix is None else feature_matrix
        hash_projections = drawn_projections if hash_projections is None else hash_projections
    if tuple(feature_matrix.shape) != (num_features, dim):
        raise ValueError(f"feature_matrix must have shape {(num_features, dim)}, got {tuple(feature_matrix.shape)}")
    if sparse == "lsh" and tuple(hash_projections.shape) != (n_hashes, dim + 2):
        raise ValueError(f"hash_projections must have shape {(n_hashes, dim + 2)}, got {tuple(hash_projections.shape)}")
    w = effective_feature_matrix(feature_matrix.to(device=query.device, dtype=torch.float32), feature_type)
    settings = ChainSettings(
        scale=default_scale(scale, dim), is_causal=bool(is_causal),
        key_valid=None if key_padding_mask is None else ~key_padding_mask, threshold=threshold,
        sparse_threshold=sparse_threshold, stats=stats, exact_factors=factors == "exact", kernel_dtype=kernel_dtype,
        sparse=None if sparse == "none" else config,
        hash_projections=hash_projections if sparse == "lsh" else None,
    )
    if attends_nothing(query):  # no rows: the empty output of the exact attention (no backward to chain)
        return exact_attention(query, key, value, scale=settings.scale, is_causal=settings.is_causal,
                               key_valid=settings.key_valid)
    return ChainedLowRankAttentionFunction.apply(query, key, value, w, settings)


def _kernel_dtype(backend: str, query: torch.Tensor, value: torch.Tensor) -> torch.dtype | None:
    """The Kronecker kernels' operand dtype for this backend and input (None: torch einsums)."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be one of ('auto', 'reference', 'triton'), got {backend!r}")
    if backend == "reference":
        return None
    reason = triton_backend.unsupported_reason(query, is_causal=False, value=value,  # fp32 operands on CPU
                                               max_head_dim=triton_backend.CHAINED_MAX_HEAD_DIM, bf16_dots=False)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
    if reason is not None or (backend == "auto" and query.device.type != "cuda"):
        return None
    from .kernels import chained_grad

    return chained_grad.operand_dtype(query.dtype, query.device)


class ChainedLowRankAttention(ScatterbrainAttention):
    """Module form of `chained_lowrank_attention`: exact forward, chained low-rank backward.

    Owns its feature matrix and, with sparse='lsh', its hash projections (float32 buffers with the
    seed, draw counter and redraw policy of `ScatterbrainAttention`, whose machinery it reuses) and
    its own `stats` (tier counts). forward(q, k, v, *, scale=None, is_causal=False, key_padding_mask=None).
    """

    def __init__(self, head_dim: int, *, num_features: int = 256, feature_type: str = "positive",
                 threshold: float | None = DEFAULT_THRESHOLD, sparse: str = "none", bucket_size: int = 128,
                 n_hashes: int = 1, window: int = 128, sparse_threshold: float | None = None,
                 redraw_interval: int | None = None, seed: int | None = None, backend: str = "auto"):
        _check_num_features(num_features)
        _check_tiers(threshold, sparse_threshold, sparse)
        super().__init__(head_dim, num_features=num_features, feature_type=feature_type, sparse=sparse,
                         bucket_size=bucket_size, n_hashes=n_hashes, window=window,
                         redraw_interval=redraw_interval, seed=seed, backend=backend)
        self.threshold = threshold
        self.sparse_threshold = sparse_threshold
        self.stats = ChainedGradientStats()

    @follows_autocast(method=True)
    def forward(self, query, key, value, *, scale=None, is_causal=False, key_padding_mask=None):
        validate_qkv(query, key, value, key_padding_mask, scale)
        if query.shape[-1] != self.head_dim:
            raise ValueError(
                f"query head_dim {query.shape[-1]} does not match this module's head_dim {self.head_dim}"
            )
        self._advance_schedule()
        features, projections = self._random_parameters()
        c = self.config
        return chained_lowrank_attention.__wrapped__(  # (this forward already follows autocast)
            query, key, value, scale=scale, is_causal=is_causal, key_padding_mask=key_padding_mask,
            num_features=c.num_features, feature_type=c.feature_type, threshold=self.threshold,
            sparse=c.sparse, bucket_size=c.bucket_size, n_hashes=c.n_hashes, window=c.window,
            sparse_threshold=self.sparse_threshold, feature_matrix=features,
            hash_projections=projections if c.sparse == "lsh" else None,
            stats=self.stats, backend=self.backend,
        )

    def extra_repr(self) -> str:
        c = self.config
        sparse = "" if c.sparse == "none" else (
            f", sparse={c.sparse!r}, bucket_size={c.bucket_size}, n_hashes={c.n_hashes}, window={c.window}, "
            f"sparse_threshold={self.sparse_threshold}"
        )
        return (f"head_dim={self.head_dim}, num_features={c.num_features}, "
                f"feature_type={c.feature_type!r}, threshold={self.threshold}{sparse}, "
                f"redraw_interval={self.redraw_interval}, backend={self.backend!r}")


LORA_PROJECTION_NAMES = {
    "q": ("q_proj", "query", "q", "wq", "to_q"),
    "k": ("k_proj", "key", "k", "wk", "to_k"),
    "v": ("v_proj", "value", "v", "wv", "to_v"),
}


def attention_lora_targets(model: torch.nn.Module, mode: str = "partial") -> list[str]:
    """Names of the nn.Linear query/key/value projections for peft's LoraConfig(target_modules=...).

    mode 'partial' adapts W_Q and W_V, 'full' adapts W_Q, W_K and W_V (Hu et al. 2025). Recognises
    the usual names (q_proj / query / to_q ...) of Linears whose parent module holds all three
    projections, so that a lone `value` head or `q` layer elsewhere is not taken for one. Raises
    if the model has none: a fused qkv projection cannot be adapted partially.
    """
    if mode not in ("partial", "full"):
        raise ValueError(f"mode must be 'partial' or 'full', got {mode!r}")
    wanted = ("q", "v") if mode == "partial" else ("q", "k", "v")
    modules = dict(model.named_modules())

    def holds_qkv(parent: torch.nn.Module) -> bool:
        children = dict(parent.named_children())
        return all(any(isinstance(children.get(n), torch.nn.Linear) for n in LORA_PROJECTION_NAMES[role])
                   for role in ("q", "k", "v"))

    names = []
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        if (isinstance(module, torch.nn.Linear) and any(leaf in LORA_PROJECTION_NAMES[w] for w in wanted)
                and holds_qkv(modules[parent])):
            names.append(name)
    if not names:
        raise ValueError(
            "no separate query/key/value nn.Linear projections found (looked for "
            f"{sorted(n for w in wanted for n in LORA_PROJECTION_NAMES[w])}); a fused qkv projection "
            "cannot be adapted partially"
        )
    return names
