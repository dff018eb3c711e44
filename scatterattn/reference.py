"""Pure-PyTorch references: dense softmax attention and Scatterbrain (sparse + low-rank).

These are the ground truth for the kernels and the CPU path of the public API. The formulas are
those of shared/docs/scatterbrain-math.md; this file is the one place they are written in PyTorch.

Shapes: query (B, H, N, D); key, value (B, Hkv, S, D) with H % Hkv == 0 (grouped-query heads are
handled by viewing the queries as (B, Hkv, G, N, D), never by copying keys or values).
Computation runs in float32 (float64 for float64 inputs) and returns the input dtype.

Scatterbrain (per row i, with phi the FAVOR+ map and Sup the sparse support):
    A^_ij = exp(s_ij) on Sup, phi(q~_i) . phi(k~_j) elsewhere;  O_i = sum_j A^_ij v_j / sum_j A^_ij
computed as  num_i = phi_i^T KV + sum_{j in Sup_i} C_ij v_j,  den_i = phi_i^T z + sum_{j in Sup_i} C_ij,
with KV = sum_j phi_j v_j^T, z = sum_j phi_j, C_ij = exp(s_ij) - phi_i . phi_j.
Special cases: Sup = all pairs is exact softmax attention; no features (m = 0) is sparse softmax over
Sup; no support is Performer.

Stabilisation (constants of the computation, no gradient; they cancel in O):
  * key side: per feature f, g_f = max over real keys of (w_f . k~_j - |k~_j|^2 / 2), so every key
    feature exp(. - g_f) <= 1 and the largest is exactly 1;
  * row side: r_i = max(max_f (w_f . q~_i - |q~_i|^2/2 + g_f), max_{j in Sup_i} s_ij), so every
    exponent in row i is <= 0. Both terms of row i carry the same factor exp(-r_i).
Rows with no key at all (every key masked) return zeros.
"""

from __future__ import annotations

import math

import torch

from .features import feature_logits
from .sparsity import SparsePlan

CAUSAL_CHUNK = 64
# Causal rows of the low-rank term: g_f is a max over all keys, some of them invisible to early rows.
# Where those rows' visible key features fall more than this below g (`causal_feature_gap`), their
# float32 products would underflow (exp(-60) ~ 1e-26 keeps ~12 orders of headroom above float32's
# 1e-38), so such calls run in float64 (good up to a gap of ~700), counted in FALLBACKS.
CAUSAL_GAP_FLOAT32 = 60.0
FALLBACKS = {"causal_float64": 0}  # calls of scatterbrain_reference rerun in float64, by reason


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention, materialising the (N, S) scores. Ground truth for small inputs.

    Causal masking is top-left aligned (key j visible to query i when j <= i), as in
    torch.nn.functional.scaled_dot_product_attention. key_valid (B, S) bool, True = real key.
    """
    batch, heads, n_q, dim = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    cd = compute_dtype(query.dtype)
    q = query.to(cd).reshape(batch, kv_heads, heads // kv_heads, n_q, dim)
    k, v = key.to(cd), value.to(cd)
    scores = torch.einsum("bhgnd,bhsd->bhgns", q, k) * scale
    allowed = _dense_allowed(batch, n_q, n_k, is_causal, key_valid, query.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.detach().amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    num = torch.einsum("bhgns,bhsd->bhgnd", weights, v)
    out = num / _safe_den(weights.sum(-1, keepdim=True))
    return out.reshape(batch, heads, n_q, value.shape[-1]).to(query.dtype)


def _dense_allowed(batch, n_q, n_k, is_causal, key_valid, device):
    """(B or 1, 1, 1, N, S) bool: which pairs the mask lets through."""
    allowed = torch.ones(1, 1, 1, n_q, n_k, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed & torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, None, :]
    return allowed


def _safe_den(den: torch.Tensor) -> torch.Tensor:
    """den where positive, 1 elsewhere (rows with no key have num = 0 and return 0)."""
    return torch.where(den > 0, den, torch.ones_like(den))


def scatterbrain_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    feature_matrix: torch.Tensor | None,
    plan: SparsePlan | None,
    is_causal: bool = False,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scatterbrain attention without any (N, S) tensor; memory O(N (m + R tk)) per head.

    feature_matrix (m, D): the rows the feature map uses (already [W; -W] for the hyperbolic
    variant), or None for no low-rank part. plan: the sparse support, or None for none.
    At least one of the two must be given.
    """
    if feature_matrix is None and plan is None:
        raise ValueError("scatterbrain_reference needs a feature_matrix, a plan, or both")
    settings = dict(scale=scale, feature_matrix=feature_matrix, plan=plan, is_causal=is_causal, key_valid=key_valid)
    check = is_causal and feature_matrix is not None and compute_dtype(query.dtype) == torch.float32
    out, gap = _scatterbrain_reference(query, key, value, **settings, with_gap=check)
    if not check:
        return out
    if not _values_readable(query):  # traced, fake, meta, vmapped or captured: both, selected
        out64, _ = _scatterbrain_reference(*(x.to(torch.float64) for x in (query, key, value)), **settings)
        return torch.where(gap > CAUSAL_GAP_FLOAT32, out64.to(query.dtype), out)
    if float(gap) > CAUSAL_GAP_FLOAT32:  # one host sync per causal call
        FALLBACKS["causal_float64"] += 1
        out64, _ = _scatterbrain_reference(*(x.to(torch.float64) for x in (query, key, value)), **settings)
        return out64.to(query.dtype)
    return out


def _values_readable(x: torch.Tensor) -> bool:
    """Whether a value computed from x can be read on the host here: plain eager tensors, not under
    torch.compile, a dispatch mode (FakeTensorMode, make_fx), a functorch transform (vmap, grad),
    on the meta device or during CUDA-graph capture."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or type(x) is not torch.Tensor or x.is_meta or torch._C._are_functorch_transforms_active()
                or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def causal_feature_gap(q, k, feature_matrix, key_valid=None) -> torch.Tensor:
    """0-d: how far (in log units) a causal row's largest low-rank term falls below its stabiliser.

    q (B, Hkv, G, N, D), k (B, Hkv, S, D), both already scaled by sqrt(tau). Row i's stabiliser
    uses g_f, the max over *all* keys, but it sees only keys j <= i: its largest product is
    exp(-gap_i) with gap_i = max_f (l(q_i)_f + g_f) - max_f (l(q_i)_f + max_{j <= i} l(k_j)_f).
    Returns the max over rows that do not see every key (rows without a real key yet skipped)."""
    q_logits, _, k_logits, key_shift = _stabilised(q.detach(), k.detach(), feature_matrix, key_valid)
    return _causal_gap(q_logits, k_logits, key_shift)


def _causal_gap(q_logits, k_logits, key_shift) -> torch.Tensor:
    """`causal_feature_gap` from `_stabilised`'s q_logits = l(q) + g, l(k) and g."""
    n = min(q_logits.shape[-2], k_logits.shape[-2])
    shifted = q_logits.detach()[..., :n, :]
    seen = torch.cummax(k_logits.detach()[..., :n, :], dim=-2).values - key_shift  # <= 0, -inf before a real key
    gap = shifted.amax(-1) - (shifted + seen.unsqueeze(2)).amax(-1)
    return torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap)).amax()


def _scatterbrain_reference(query, key, value, *, scale, feature_matrix, plan, is_causal, key_valid,
                            with_gap=False):
    """(out, `causal_feature_gap` when with_gap, else None), from the same feature logits."""
    batch, heads, n_q, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    cd = compute_dtype(query.dtype)
    root_scale = math.sqrt(scale)
    q = (query.to(cd) * root_scale).reshape(batch, kv_heads, group, n_q, dim)
    k = key.to(cd) * root_scale
    v = value.to(cd)

    # Row stabiliser slots have one extra entry (index n_q) for empty tile slots.
    row_max = q.new_full((batch, kv_heads, group, n_q + 1), float("-inf"))
    gap = None
    if feature_matrix is not None:
        q_logits, phi_k, k_logits, key_shift = _stabilised(q, k, feature_matrix, key_valid)
        # (padded, not written in place: vmap over stacked module buffers)
        row_max = torch.nn.functional.pad(q_logits.detach().amax(-1), (0, 1), value=float("-inf"))
        if with_gap:
            gap = _causal_gap(q_logits, k_logits, key_shift)

    if plan is not None:
        tiles = SparseTiles(q, k, plan, is_causal=is_causal, key_valid=key_valid)
        scores = tiles.scores.masked_fill(~tiles.mask, float("-inf"))
        row_max = row_max.scatter_reduce(
            -1, tiles.q_flat, scores.detach().amax(-1).flatten(3), reduce="amax"
        )
    row_max = _finite_or_zero(row_max)

    v_dim = value.shape[-1]
    num = q.new_zeros(batch, kv_heads, group, n_q + 1, v_dim)
    den = q.new_zeros(batch, kv_heads, group, n_q + 1)
    if feature_matrix is not None:
        m = feature_matrix.shape[0]
        phi_q = torch.exp(q_logits - row_max[..., :n_q, None]) / m
        if is_causal:
            lr_num, lr_den = _causal_low_rank(phi_q, phi_k, v)
        else:
            kv_state = torch.einsum("bhsm,bhsd->bhmd", phi_k, v)
            z_state = phi_k.sum(-2)
            lr_num = torch.einsum("bhgnm,bhmd->bhgnd", phi_q, kv_state)
            lr_den = torch.einsum("bhgnm,bhm->bhgn", phi_q, z_state)
        num = num + torch.nn.functional.pad(lr_num, (0, 0, 0, 1))
        den = den + torch.nn.functional.pad(lr_den, (0, 1))

    if plan is not None:
        tile_row_max = tiles.take_rows(row_max.unsqueeze(-1)).squeeze(-1)
        exact = torch.exp(scores - tile_row_max.unsqueeze(-1))  # 0 off the support
        if feature_matrix is not None:
            phi_q_tiles = tiles.take_rows(torch.nn.functional.pad(phi_q, (0, 0, 0, 1)))
            phi_k_tiles = tiles.take_keys(torch.nn.functional.pad(phi_k, (0, 0, 0, 1)))
            low_rank = torch.einsum("bhgrtqm,bhxrtkm->bhgrtqk", phi_q_tiles, phi_k_tiles)
            correction = exact - low_rank * tiles.mask
        else:
            correction = exact
        v_tiles = tiles.take_keys(torch.nn.functional.pad(v, (0, 0, 0, 1)))
        tile_num = torch.einsum("bhgrtqk,bhxrtkd->bhgrtqd", correction, v_tiles)
        index = tiles.q_flat.unsqueeze(-1).expand(-1, -1, -1, -1, v_dim)
        num = num.scatter_add(-2, index, tile_num.flatten(3, 5))
        den = den.scatter_add(-1, tiles.q_flat, correction.sum(-1).flatten(3))

    out = num[..., :n_q, :] / _safe_den(den[..., :n_q]).unsqueeze(-1)
    return out.reshape(batch, heads, n_q, v_dim).to(query.dtype), gap


def stabilised_features(q, k, feature_matrix, key_valid=None):
    """Key features and shifted query feature logits with the per-feature key stabiliser g.

    q (B, Hkv, G, N, D), k (B, Hkv, S, D), already scaled by sqrt(tau); feature_matrix (m, D).
    Returns q_logits (B, Hkv, G, N, m) = l(q) + g and phi_k (B, Hkv, S, m) = exp(l(k) - g) <= 1
    (0 for masked keys), g_f = max over real keys of l(k)_f (no gradient); so that
    exp(q_logits - r) . phi_k = exp(-r) sum_f exp(l(q)_f + l(k)_f) for any row constant r.
    """
    q_logits, phi_k, _, _ = _stabilised(q, k, feature_matrix, key_valid)
    return q_logits, phi_k


def _stabilised(q, k, feature_matrix, key_valid):
    """`stabilised_features`' (q_logits, phi_k) and the masked key logits l(k) and g (B, Hkv, 1, m)."""
    w = feature_matrix.to(device=q.device, dtype=q.dtype)
    k_logits = feature_logits(k, w)
    if key_valid is not None:
        k_logits = k_logits.masked_fill(~key_valid[:, None, :, None], float("-inf"))
    key_shift = _finite_or_zero(k_logits.detach().amax(dim=-2, keepdim=True))
    return feature_logits(q, w) + key_shift.unsqueeze(2), torch.exp(k_logits - key_shift), k_logits, key_shift


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _causal_low_rank(phi_q, phi_k, v, chunk: int = CAUSAL_CHUNK):
    """Prefix-sum low-rank term, key j visible to query i when j <= i (top-left aligned).

    Chunked as linear-attention kernels do: exact products inside a chunk, running state across.
    phi_q (B, Hkv, G, N, m), phi_k (B, Hkv, S, m), v (B, Hkv, S, D) -> num (B,Hkv,G,N,D), den (B,Hkv,G,N).
    """
    n_q, n_k = phi_q.shape[-2], phi_k.shape[-2]
    length = math.ceil(max(n_q, n_k) / chunk) * chunk
    n_chunks = length // chunk
    pq = torch.nn.functional.pad(phi_q, (0, 0, 0, length - n_q)).unflatten(-2, (n_chunks, chunk))
    pk = torch.nn.functional.pad(phi_k, (0, 0, 0, length - n_k)).unflatten(-2, (n_chunks, chunk))
    pv = torch.nn.functional.pad(v, (0, 0, 0, length - n_k)).unflatten(-2, (n_chunks, chunk))
    chunk_kv = torch.einsum("bhclm,bhcld->bhcmd", pk, pv)
    chunk_z = pk.sum(-2)
    # State of the chunks strictly before: shift the inclusive prefix sums by one chunk.
    prev_kv = torch.nn.functional.pad(torch.cumsum(chunk_kv, dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    prev_z = torch.nn.functional.pad(torch.cumsum(chunk_z, dim=2)[:, :, :-1], (0, 0, 1, 0))
    num = torch.einsum("bhgclm,bhcmd->bhgcld", pq, prev_kv)
    den = torch.einsum("bhgclm,bhcm->bhgcl", pq, prev_z)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
    intra = torch.einsum("bhgclm,bhcsm->bhgcls", pq, pk) * tril
    num = num + torch.einsum("bhgcls,bhcsd->bhgcld", intra, pv)
    den = den + intra.sum(-1)
    return num.flatten(3, 4)[..., :n_q, :], den.flatten(3, 4)[..., :n_q]


class SparseTiles:
    """Gathered tiles of a SparsePlan and the mask of support pairs, in compute layout.

    q (B, Hkv, G, N, D) and k (B, Hkv, S, D), both already scaled by sqrt(tau).
    scores, mask: (B, Hkv, G, R, T, tq, tk); q_pos (B, Hkv, G, R, T, tq) in [0, N] and
    k_pos (B, Hkv, 1, R, T, tk) in [0, S] (N and S mark empty slots); q_flat = q_pos.flatten(3).
    """

    def __init__(self, q, k, plan: SparsePlan, *, is_causal, key_valid):
        batch, kv_heads, group, n_q, dim = q.shape
        n_k = k.shape[2]
        _, _, n_rounds, n_tiles, tq = plan.q_index.shape
        tk = plan.k_index.shape[-1]
        self.shape = (batch, kv_heads, group, n_rounds, n_tiles)
        q_index = plan.q_index.to(q.device)
        k_index = plan.k_index.to(q.device)
        q_index = q_index.reshape(q_index.shape[0], -1, group if q_index.shape[1] > 1 else 1,
                                  n_rounds, n_tiles, tq)
        self.q_pos = q_index.expand(batch, kv_heads, group, n_rounds, n_tiles, tq)
        self.k_pos = k_index.unsqueeze(2).expand(batch, kv_heads, 1, n_rounds, n_tiles, tk)
        self.q_flat = self.q_pos.flatten(3)
        self.k_flat = self.k_pos.flatten(3)

        q_tiles = self.take_rows(torch.nn.functional.pad(q, (0, 0, 0, 1)))
        k_tiles = self.take_keys(torch.nn.functional.pad(k, (0, 0, 0, 1)))
        self.scores = torch.einsum("bhgrtqd,bhxrtkd->bhgrtqk", q_tiles, k_tiles)

        qi = self.q_pos.unsqueeze(-1)
        kj = self.k_pos.unsqueeze(-2)
        mask = (qi < n_q) & (kj < n_k)
        if key_valid is not None:
            valid = torch.nn.functional.pad(key_valid, (0, 1), value=False)
            valid = valid[:, None, :].expand(batch, kv_heads, n_k + 1)
            mask = mask & valid.gather(-1, self.k_flat.squeeze(2)).reshape(self.k_pos.shape).unsqueeze(-2)
        if is_causal:
            mask = mask & (qi >= kj)
        if plan.band is not None:
            mask = mask & ((qi - kj).abs() <= plan.band)
        if plan.q_bucket is not None and n_rounds > 1:
            mask = mask & ~self._owned_by_earlier_round(plan, group)
        self.mask = mask

    def _owned_by_earlier_round(self, plan: SparsePlan, group: int) -> torch.Tensor:
        """True where the pair already shared a bucket in an earlier round (counted there)."""
        batch, kv_heads, _, n_rounds, n_tiles = self.shape
        q_bucket = torch.nn.functional.pad(plan.q_bucket, (0, 1), value=-1)
        q_bucket = q_bucket.reshape(batch, kv_heads, group, n_rounds, -1)
        k_bucket = torch.nn.functional.pad(plan.k_bucket, (0, 1), value=-2)
        seen = torch.zeros(self.scores.shape, dtype=torch.bool, device=self.scores.device)
        for r in range(1, n_rounds):
            q_rows = self.q_pos[:, :, :, r].flatten(3)  # (B, Hkv, G, T*tq)
            k_rows = self.k_pos[:, :, 0, r].flatten(2)  # (B, Hkv, T*tk)
            for earlier in range(r):
                qb = q_bucket[:, :, :, earlier].gather(-1, q_rows).reshape(self.q_pos[:, :, :, r].shape)
                kb = k_bucket[:, :, earlier].gather(-1, k_rows).reshape(self.k_pos[:, :, 0, r].shape)
                seen[:, :, :, r] |= qb.unsqueeze(-1) == kb.unsqueeze(2).unsqueeze(-2)
        return seen

    def take_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Hkv, G, N + 1, F) -> (B, Hkv, G, R, T, tq, F) at the tiles' query positions."""
        index = self.q_flat.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
        return x.expand(*self.q_flat.shape[:3], *x.shape[3:]).gather(-2, index).reshape(
            *self.q_pos.shape, x.shape[-1]
        )

    def take_keys(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Hkv, S + 1, F) -> (B, Hkv, 1, R, T, tk, F) at the tiles' key positions."""
        k_flat = self.k_flat.squeeze(2)
        index = k_flat.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
        return x.gather(-2, index).reshape(*self.k_pos.shape, x.shape[-1])
