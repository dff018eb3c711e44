"""Exact model, approximate gradient: chained low-rank attention backward (Hu et al., ICLR 2025).

The forward is exact softmax attention (SDPA on CUDA, the dense reference on the CPU). The backward
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

import math
from dataclasses import dataclass, field

import torch

from . import reference, triton_backend
from .features import draw_feature_matrix, effective_feature_matrix, make_generator
from .functional import default_scale, validate_qkv
from .modules import ScatterbrainAttention

DEFAULT_THRESHOLD = 2.0  # logit bound: ~20% gradient error at m = 256 (bench/results/phase_transition.md)
ROW_BLOCK = 256  # rows per block when contracting with the (m, Dv, D) middle factors
CAUSAL_CHUNK = 64


@dataclass
class ChainedGradientStats:
    """Counts of (batch, key/value head) groups whose backward was approximate or fell back to exact."""

    approximate: int = 0
    fallback: int = 0  # all exact groups: above the threshold, or numeric (below)
    numeric: int = 0  # of which: below the threshold, but the factors underflowed
    max_logit_bound: float = 0.0
    history: list = field(default_factory=list)  # per backward: (approximate, fallback)

    def record(self, approximate: int, fallback: int, bound: float, numeric: int = 0) -> None:
        self.approximate += approximate
        self.fallback += fallback
        self.numeric += numeric
        self.max_logit_bound = max(self.max_logit_bound, bound)
        self.history.append((approximate, fallback))

    @property
    def fallback_fraction(self) -> float:
        total = self.approximate + self.fallback
        return self.fallback / total if total else 0.0

    def reset(self) -> None:
        self.approximate = self.fallback = self.numeric = 0
        self.max_logit_bound = 0.0
        self.history.clear()


GLOBAL_STATS = ChainedGradientStats()


def logit_bound(query: torch.Tensor, key: torch.Tensor, scale: float, key_valid=None) -> torch.Tensor:
    """(B, Hkv): tau * max_i |q_i| * max_j |k_j| over each key/value head's query group, an upper
    bound on |s_ij|. The random-feature variance grows like exp(|q~ + k~|^2) / m, so this is the
    quantity the threshold is applied to."""
    batch, heads, n_q, _ = query.shape
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
    if is_causal:
        n_q = q.shape[-2]
        prefix = torch.cumsum(v1, dim=-2)  # (B, Hkv, S, m): z_i = sum_{j <= i} V1_j
        prefix = torch.nn.functional.pad(prefix, (0, 0, 0, max(0, n_q - prefix.shape[-2])), mode="replicate")
        den = (p * prefix[..., :n_q, :].unsqueeze(2)).sum(-1, keepdim=True)
    else:
        den = p @ v1.sum(-2).unsqueeze(2).unsqueeze(-1)
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


def chained_attention_backward(q, k, v, grad_out, u1, v1, scale, *, is_causal=False, kernels=False):
    """(dq, dk, dv) of attention for f = U1 V1^T (masked causally when is_causal), in O(N m D Dv).

    q (B, Hkv, G, N, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), grad_out (B, Hkv, G, N, Dv),
    u1 (B, Hkv, G, N, m), v1 (B, Hkv, S, m). Padded keys must have V1 rows of zero. With exact
    factors (U1 = P, V1 = I) this is the exact attention backward. kernels=True computes the two
    Kronecker products with the Triton kernels of scatterattn.kernels.chained_grad (fp32).
    """
    gram, rows = _kron_ops(kernels)
    if is_causal:
        return _chain_causal(q, k, v, grad_out, u1, v1, scale, gram=gram, rows=rows)
    o_tilde = u1 @ (v1.transpose(-1, -2) @ v).unsqueeze(2)
    rho = (grad_out * o_tilde).sum(-1, keepdim=True)
    m1 = gram(v1, v, k)  # (V1 (x) V)^T K: (B, Hkv, m, Dv, D)
    v1k = (v1.transpose(-1, -2) @ k).unsqueeze(2)  # V1^T K: (m, D)
    dq = torch.cat(
        [
            rows(u1[..., r:r + ROW_BLOCK, :], grad_out[..., r:r + ROW_BLOCK, :], m1.unsqueeze(2))
            for r in range(0, u1.shape[-2], ROW_BLOCK)
        ],
        dim=-2,
    )
    dq = scale * (dq - rho * (u1 @ v1k))
    m2 = gram(u1, grad_out, q).sum(2)  # (U1 (x) dO)^T Q, summed over the group
    dk = torch.cat(
        [rows(v1[..., r:r + ROW_BLOCK, :], v[..., r:r + ROW_BLOCK, :], m2) for r in range(0, v1.shape[-2], ROW_BLOCK)],
        dim=-2,
    )
    u1_rho_q = torch.einsum("bhgna,bhgnd->bhad", u1, rho * q)  # U1^T diag(rho) Q, summed over G
    dk = scale * (dk - v1 @ u1_rho_q)
    dv = v1 @ torch.einsum("bhgna,bhgne->bhae", u1, grad_out)
    return dq, dk, dv


def _kron_ops(kernels: bool):
    """(gram, rows): the torch versions below, or the Triton kernels (results cast back)."""
    if not kernels:
        return _kron_gram, _kron_rows
    from .kernels import chained_grad

    def gram(a, b, c):
        return chained_grad.kron_gram(a, b, c).to(a.dtype)

    def rows(a, b, middle):
        return chained_grad.kron_rows(a, b, middle).to(a.dtype)

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
    """Rows (a_i (x) b_i) . middle, middle (..., m, Dv, D): sum_{a,e} a_ia b_ie middle[a, e, :]."""
    return torch.einsum("...na,...ne,...aed->...nd", a, b, middle)


def _chain_causal(q, k, v, grad_out, u1, v1, scale, *, gram=None, rows=None, chunk=CAUSAL_CHUNK):
    """Causal chain (key j visible to query i when j <= i): exact products inside a chunk, running
    prefix states (forward in i) for dq and suffix states (backward in j) for dk, dv."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    length = math.ceil(max(n_q, n_k) / chunk) * chunk

    def pad_rows(x, n):
        return torch.nn.functional.pad(x, (0, 0, 0, length - n))

    q_, do_, u1_ = pad_rows(q, n_q), pad_rows(grad_out, n_q), pad_rows(u1, n_q)
    k_, v_, v1_ = pad_rows(k, n_k), pad_rows(v, n_k), pad_rows(v1, n_k)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    batch, kv_heads, group = q.shape[:3]
    m, dim, v_dim = u1.shape[-1], q.shape[-1], v.shape[-1]
    state_m1 = q.new_zeros(batch, kv_heads, 1, m, v_dim, dim)
    state_v1k = q.new_zeros(batch, kv_heads, 1, m, dim)
    state_v1v = q.new_zeros(batch, kv_heads, 1, m, v_dim)
    dq_chunks, rho_chunks = [], []
    for c0 in range(0, length, chunk):
        sl = slice(c0, c0 + chunk)
        u, do, kc, vc, v1c = u1_[..., sl, :], do_[..., sl, :], k_[..., sl, :], v_[..., sl, :], v1_[..., sl, :]
        f = (u @ v1c.unsqueeze(2).transpose(-1, -2)) * tril  # (B, Hkv, G, L, L)
        o_tilde = u @ state_v1v + f @ vc.unsqueeze(2)
        rho = (do * o_tilde).sum(-1, keepdim=True)
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
        state_m2 = state_m2 + gram(u, do, qc).sum(2)
        state_urq = state_urq + torch.einsum("bhgna,bhgnd->bhad", u, rho * qc)
        state_udo = state_udo + torch.einsum("bhgna,bhgne->bhae", u, do)
    dq = torch.cat(dq_chunks, dim=-2)[..., :n_q, :]
    dk = torch.cat(dk_chunks[::-1], dim=-2)[..., :n_k, :]
    dv = torch.cat(dv_chunks[::-1], dim=-2)[..., :n_k, :]
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd


def exact_attention(query, key, value, *, scale, is_causal, key_valid):
    """Exact softmax attention: SDPA (flash / cuDNN / CPU flash kernels) without key padding, the
    dense reference with it (so that rows whose keys are all padded give zeros, not NaN)."""
    if key_valid is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, scale=scale, is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1]
        )
    return reference.dense_attention(query, key, value, scale=scale, is_causal=is_causal, key_valid=key_valid)


class ChainedLowRankAttentionFunction(torch.autograd.Function):
    """Exact forward; backward by the chained low-rank approximation, per group with an exact fallback."""

    @staticmethod
    def forward(ctx, query, key, value, feature_matrix, scale, is_causal, key_valid, threshold, stats, exact_factors,
                kernels):
        out = exact_attention(query, key, value, scale=scale, is_causal=is_causal, key_valid=key_valid)
        ctx.save_for_backward(query, key, value, feature_matrix)
        ctx.scale, ctx.is_causal, ctx.key_valid = scale, is_causal, key_valid
        ctx.threshold, ctx.stats, ctx.exact_factors, ctx.kernels = threshold, stats, exact_factors, kernels
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, feature_matrix = ctx.saved_tensors
        scale, is_causal, key_valid = ctx.scale, ctx.is_causal, ctx.key_valid
        batch, heads, n_q, dim = query.shape
        kv_heads, v_dim = key.shape[1], value.shape[-1]
        group = heads // kv_heads
        bound = logit_bound(query, key, scale, key_valid)  # (B, Hkv)
        over = bound > ctx.threshold if ctx.threshold is not None else torch.zeros_like(bound, dtype=torch.bool)

        cd = reference.compute_dtype(query.dtype)
        q = query.detach().to(cd).reshape(batch, kv_heads, group, n_q, dim)
        k, v = key.detach().to(cd), value.detach().to(cd)
        do = grad_out.to(cd).reshape(batch, kv_heads, group, n_q, v_dim)
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        exact_groups = over.clone()
        numeric = torch.zeros_like(over)
        b_c, h_c = (~over).nonzero(as_tuple=True)  # groups for the chain (none above the threshold)
        if len(b_c) == batch * kv_heads:  # all of them: no gather
            dq, dk, dv, numeric = _chain_groups(ctx, q, k, v, do, feature_matrix, key_valid)
            exact_groups = numeric
        elif len(b_c):
            kv_sel = None if key_valid is None else key_valid[b_c]
            g_dq, g_dk, g_dv, g_numeric = _chain_groups(
                ctx, q[b_c, h_c].unsqueeze(1), k[b_c, h_c].unsqueeze(1), v[b_c, h_c].unsqueeze(1),
                do[b_c, h_c].unsqueeze(1), feature_matrix, kv_sel,
            )
            dq[b_c, h_c], dk[b_c, h_c], dv[b_c, h_c] = g_dq[:, 0], g_dk[:, 0], g_dv[:, 0]
            numeric[b_c, h_c] = g_numeric[:, 0]
            exact_groups = over | numeric
        dq = dq.reshape(batch, heads, n_q, dim)

        n_exact = int(exact_groups.sum())
        if n_exact:
            b_idx, h_idx = exact_groups.nonzero(as_tuple=True)
            head_idx = (h_idx[:, None] * group + torch.arange(group, device=h_idx.device)).reshape(-1)
            b_rep = b_idx.repeat_interleave(group)
            with torch.enable_grad():
                qs = query.detach()[b_rep, head_idx].reshape(n_exact, group, n_q, dim).requires_grad_()
                ks = key.detach()[b_idx, h_idx].unsqueeze(1).requires_grad_()
                vs = value.detach()[b_idx, h_idx].unsqueeze(1).requires_grad_()
                kv_mask = None if key_valid is None else key_valid[b_idx]
                out = exact_attention(qs, ks, vs, scale=scale, is_causal=is_causal, key_valid=kv_mask)
                gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), grad_out[b_rep, head_idx].reshape(out.shape))
            dq[b_rep, head_idx] = gq.reshape(-1, n_q, dim).to(dq.dtype)
            dk[b_idx, h_idx] = gk.squeeze(1).to(dk.dtype)
            dv[b_idx, h_idx] = gv.squeeze(1).to(dv.dtype)
        if ctx.stats is not None:
            max_bound, n_numeric = torch.stack([bound.max(), numeric.sum().to(bound.dtype)]).tolist()  # one sync
            ctx.stats.record(bound.numel() - n_exact, n_exact, max_bound, numeric=int(n_numeric))
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None, None, None, None, None, None


def _chain_groups(ctx, q, k, v, do, feature_matrix, key_valid):
    """The chain for the given groups (compute layout); also which groups' factors underflowed."""
    if ctx.exact_factors:
        u1, v1 = exact_factors(q, k, ctx.scale, is_causal=ctx.is_causal, key_valid=key_valid)
        numeric = torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
    else:
        u1, v1, underflow = random_feature_factors(
            q, k, feature_matrix, ctx.scale, is_causal=ctx.is_causal, key_valid=key_valid
        )
        numeric = underflow.flatten(2).any(-1)
    dq, dk, dv = chained_attention_backward(
        q, k, v, do, u1, v1, ctx.scale, is_causal=ctx.is_causal, kernels=ctx.kernels
    )
    return dq, dk, dv, numeric


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
    feature_matrix: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stats: ChainedGradientStats | None = GLOBAL_STATS,
    factors: str = "random",
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention forward, chained low-rank (approximate) backward: "exact model, approximate gradient".

    Shapes and masks as `scatterbrain_attention`. `threshold`: per (batch, key/value head) logit bound
    tau * max|q| * max|k| above which that group's backward is exact (None: no threshold); groups
    above it skip the chain. Independently of the threshold, groups whose random-feature normaliser
    underflows (causal rows, very large logits) are computed exactly. Both are counted in `stats`
    (default: scatterattn.lora.GLOBAL_STATS; `stats.numeric` counts the second kind). `factors="exact"` uses U1 = P,
    V1 = I (O(N S) memory; the chain is then the exact backward: a check of the algebra).
    `backend`: 'reference' (torch einsums), 'triton' (the Kronecker products as Triton kernels; fp16,
    bf16, fp32 inputs, CUDA or TRITON_INTERPRET=1) or 'auto' (Triton on CUDA, else reference).
    """
    kernels = _use_kernels(backend, query)
    if factors not in ("random", "exact"):
        raise ValueError(f"factors must be 'random' or 'exact', got {factors!r}")
    validate_qkv(query, key, value, key_padding_mask, scale)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1 for the chained gradient, got {num_features!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive finite number or None, got {threshold!r}")
    dim = query.shape[-1]
    if feature_matrix is None:
        feature_matrix = draw_feature_matrix(num_features, dim, generator=generator or make_generator(seed))
    if tuple(feature_matrix.shape) != (num_features, dim):
        raise ValueError(f"feature_matrix must have shape {(num_features, dim)}, got {tuple(feature_matrix.shape)}")
    w = effective_feature_matrix(feature_matrix.to(device=query.device, dtype=torch.float32), feature_type)
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    return ChainedLowRankAttentionFunction.apply(
        query, key, value, w, default_scale(scale, dim), bool(is_causal), key_valid, threshold, stats,
        factors == "exact", kernels,
    )


def _use_kernels(backend: str, query: torch.Tensor) -> bool:
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be one of ('auto', 'reference', 'triton'), got {backend!r}")
    if backend == "reference":
        return False
    reason = triton_backend.unsupported_reason(query, is_causal=False)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
    return reason is None and (backend == "triton" or query.device.type == "cuda")


class ChainedLowRankAttention(ScatterbrainAttention):
    """Module form of `chained_lowrank_attention`: exact forward, chained low-rank backward.

    Owns its feature matrix (a float32 buffer with the seed, draw counter and redraw policy of
    `ScatterbrainAttention`, whose machinery it reuses with sparse='none') and its own
    `stats` (fallback counts). forward(q, k, v, *, scale=None, is_causal=False, key_padding_mask=None).
    """

    def __init__(self, head_dim: int, *, num_features: int = 256, feature_type: str = "positive",
                 threshold: float | None = DEFAULT_THRESHOLD, redraw_interval: int | None = None,
                 seed: int | None = None, backend: str = "auto"):
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1 for the chained gradient, got {num_features!r}")
        super().__init__(head_dim, num_features=num_features, feature_type=feature_type, sparse="none",
                         redraw_interval=redraw_interval, seed=seed, backend=backend)
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a positive finite number or None, got {threshold!r}")
        self.threshold = threshold
        self.stats = ChainedGradientStats()

    def forward(self, query, key, value, *, scale=None, is_causal=False, key_padding_mask=None):
        validate_qkv(query, key, value, key_padding_mask, scale)
        if query.shape[-1] != self.head_dim:
            raise ValueError(
                f"query head_dim {query.shape[-1]} does not match this module's head_dim {self.head_dim}"
            )
        self._advance_schedule()
        return chained_lowrank_attention(
            query, key, value, scale=scale, is_causal=is_causal, key_padding_mask=key_padding_mask,
            num_features=self.config.num_features, feature_type=self.config.feature_type,
            threshold=self.threshold, feature_matrix=self.feature_matrix, stats=self.stats, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_features={self.config.num_features}, "
                f"feature_type={self.config.feature_type!r}, threshold={self.threshold}, "
                f"redraw_interval={self.redraw_interval}, backend={self.backend!r}")


LORA_PROJECTION_NAMES = {
    "q": ("q_proj", "query", "q", "wq", "to_q"),
    "k": ("k_proj", "key", "k", "wk", "to_k"),
    "v": ("v_proj", "value", "v", "wv", "to_v"),
}


def attention_lora_targets(model: torch.nn.Module, mode: str = "partial") -> list[str]:
    """Names of the nn.Linear query/key/value projections for peft's LoraConfig(target_modules=...).

    mode 'partial' adapts W_Q and W_V, 'full' adapts W_Q, W_K and W_V (Hu et al. 2025). Recognises
    the usual names (q_proj / query / to_q ...). Raises if the model has none: a fused qkv projection
    cannot be adapted partially.
    """
    if mode not in ("partial", "full"):
        raise ValueError(f"mode must be 'partial' or 'full', got {mode!r}")
    wanted = ("q", "v") if mode == "partial" else ("q", "k", "v")
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and any(leaf in LORA_PROJECTION_NAMES[w] for w in wanted):
            names.append(name)
    if not names:
        raise ValueError(
            "no separate query/key/value nn.Linear projections found (looked for "
            f"{sorted(n for w in wanted for n in LORA_PROJECTION_NAMES[w])}); a fused qkv projection "
            "cannot be adapted partially"
        )
    return names
