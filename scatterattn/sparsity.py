"""Sparse supports: which (query, key) pairs Scatterbrain computes exactly.

A support is described tile by tile, as flash-style kernels consume it: tile t of round r pairs a
list of query positions with a list of key positions. A pair (i, j) of a tile belongs to the support
when both positions are real (not padding), the key is not masked, the pair passes the causal rule,
it lies inside the band (local windows), and no earlier round already owns it (LSH rounds; a pair
that shares a bucket in several rounds counts once).

Shapes (B batch, H query heads, Hkv key/value heads, R rounds, T tiles, tq / tk tile widths):
  q_index (B or 1, H or 1, R, T, tq)   int64, query positions; N marks an empty slot
  k_index (B or 1, Hkv or 1, R, T, tk) int64, key positions; S marks an empty slot
  q_bucket (B, H, R, N), k_bucket (B, Hkv, R, S): bucket of each position in each round (LSH with
  several rounds only; None otherwise), used to count duplicates once.
Within a round a query appears in exactly one tile; a key may appear in several (local bands,
LSH buckets shared by several query chunks under key padding). Hashing carries no gradient.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass

import torch

from . import triton_backend


@dataclass(frozen=True)
class SparsePlan:
    """The tiles of a sparse support. See the module docstring for shapes."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    num_queries: int
    num_keys: int
    band: int | None = None  # local window: keep |i - j| <= band
    q_bucket: torch.Tensor | None = None  # LSH with several rounds: dedup across rounds
    k_bucket: torch.Tensor | None = None

    @property
    def n_rounds(self) -> int:
        return self.q_index.shape[-3]


def lsh_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    bucket_size: int,
    hash_projections: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> SparsePlan:
    """SMYRF-style asymmetric LSH with sort-based, equal-size buckets.

    query (B, H, N, D), key (B, Hkv, S, D), hash_projections (R, D + 2), key_valid (B, S) bool or None.
    XBOX+ transform with M^2 = max|q|^2 + max|k|^2 (per batch and key/value head, over its query
    group): q' = [q, 0, sqrt(M^2 - |q|^2)], k' = [k, sqrt(M^2 - |k|^2), 0], so |q' - k'|^2 =
    2 M^2 - 2 q.k. Each round projects onto a_r and sorts; the sorted keys are cut into
    n_buckets = ceil(S / bucket_size) chunks of bucket_size keys and the sorted queries into as many
    chunks of ceil(N / n_buckets) queries: query chunk b attends key chunk b (rank quantiles are
    aligned). Masked keys hash to +inf and sort last; when a batch element has padding, its query
    chunks are spread evenly over the buckets that hold real keys, so every query still attends a
    full bucket (a bucket may then serve several query chunks of a round).

    With fewer queries than buckets (decoding against a long key cache) rank quantiles say nothing,
    so each query instead attends the bucket where its hash falls among the sorted key hashes
    (searchsorted); tile t then holds the queries of bucket t (tq = N, mostly empty slots).
    """
    batch, heads, n_q, _ = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    n_rounds = hash_projections.shape[0]
    with torch.no_grad():
        q_hash, k_hash, joint = xbox_hashes(query.detach(), key.detach(), hash_projections, key_valid)
        if joint is not None:  # q's and k's hashes in one buffer: one sort
            order = torch.sort(joint, dim=-1, stable=True).indices
            q_order, k_order = order[:, :heads], order[:, heads:]
        else:
            q_order = torch.sort(q_hash, dim=-1, stable=True).indices
            k_order = torch.sort(k_hash, dim=-1, stable=True).indices

        n_buckets = math.ceil(n_k / bucket_size)
        real_buckets = None
        if key_valid is not None:
            real_buckets = torch.div(key_valid.sum(-1) + bucket_size - 1, bucket_size, rounding_mode="floor")
        if n_q < n_buckets:
            return _lsh_plan_by_key_position(
                q_hash, k_hash, k_order, bucket_size, n_buckets, real_buckets, kv_heads, n_q, n_k
            )
        q_chunk = math.ceil(n_q / n_buckets)
        q_index = _pad_last(q_order, n_buckets * q_chunk, n_q)
        k_index = _pad_last(k_order, n_buckets * bucket_size, n_k).reshape(
            batch, kv_heads, n_rounds, n_buckets, bucket_size
        )
        # Query chunk t attends key bucket tile_bucket[b, t]. Without padding that is bucket t; with
        # padding only the first ceil(real keys / bucket_size) buckets hold real keys, and the query
        # chunks are spread evenly over those (a bucket may serve several chunks).
        tile_bucket = None  # None: chunk t attends bucket t
        if key_valid is not None:
            chunk_ids = torch.arange(n_buckets, device=query.device)
            tile_bucket = torch.div(chunk_ids * real_buckets.clamp_min(1)[:, None], n_buckets, rounding_mode="floor")
            k_index = k_index.gather(
                -2, tile_bucket[:, None, None, :, None].expand(batch, kv_heads, n_rounds, n_buckets, bucket_size)
            )
        q_bucket = k_bucket = None
        if n_rounds > 1:  # only deduplication reads them
            q_bucket = _ranks_to_buckets(q_order, q_chunk)
            if tile_bucket is not None:
                q_bucket = tile_bucket[:, None, None, :].expand(batch, heads, n_rounds, n_buckets).gather(-1, q_bucket)
            k_bucket = _ranks_to_buckets(k_order, bucket_size)
        return SparsePlan(
            q_index=q_index.reshape(batch, heads, n_rounds, n_buckets, q_chunk),
            k_index=k_index,
            num_queries=n_q,
            num_keys=n_k,
            q_bucket=q_bucket,
            k_bucket=k_bucket,
        )


def xbox_hashes(query: torch.Tensor, key: torch.Tensor, hash_projections: torch.Tensor,
                key_valid: torch.Tensor | None = None):
    """The sort keys of `lsh_plan`: (q_hash (B, H, R, N), k_hash (B, Hkv, R, S), joint), fp32.

    XBOX+ with M^2 = max|q|^2 + max|k|^2 per batch and key/value head (over its query group and its
    real keys): q_hash[r] = q . a_r + sqrt(M^2 - |q|^2) a_r[D + 1], k_hash[r] = k . a_r +
    sqrt(M^2 - |k|^2) a_r[D], +inf for padded keys; hash_projections (R, D + 2).
    On CUDA (fp16/bf16/fp32) with triton installed two Triton kernels compute them from q and k in
    their own dtype (scatterattn.kernels.lsh_hash; with N = S into one buffer, `joint`
    (B, H + Hkv, R, N), so that one sort orders both); elsewhere, and beyond the kernels' grid limit
    (batch x (H + Hkv) slices), torch does it on fp32 copies and joint is None. The two agree up to
    fp32 summation order, so hashes that tie to the last bit may sort differently between the two.
    """
    batch, heads, n_q, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    n_rounds = hash_projections.shape[0]
    proj = hash_projections.to(device=query.device, dtype=torch.float32)
    if (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and batch * (heads + kv_heads) <= triton_backend.MAX_BATCH_HEADS and triton_backend.triton_available()):
        from .kernels.lsh_hash import xbox_hashes as kernel

        return kernel(query, key, proj, key_valid)
    qf, kf = query.float(), key.float()
    q_sq = (qf * qf).sum(-1).reshape(batch, kv_heads, group, n_q)  # (B, Hkv, G, N)
    q_proj = (qf @ proj[:, :dim].t()).reshape(batch, kv_heads, group, n_q, n_rounds)
    k_sq, k_proj = (kf * kf).sum(-1), kf @ proj[:, :dim].t()  # (B, Hkv, S), (B, Hkv, S, R)
    if key_valid is not None:
        k_sq = torch.where(key_valid[:, None, :], k_sq, torch.zeros_like(k_sq))
    m_sq = q_sq.amax(dim=(2, 3)) + k_sq.amax(dim=2)  # (B, Hkv)
    q_ext = (m_sq[:, :, None, None] - q_sq).clamp_min(0).sqrt()
    k_ext = (m_sq[:, :, None] - k_sq).clamp_min(0).sqrt()
    q_hash = q_proj + q_ext.unsqueeze(-1) * proj[:, dim + 1]  # (B, Hkv, G, N, R)
    k_hash = k_proj + k_ext.unsqueeze(-1) * proj[:, dim]  # (B, Hkv, S, R)
    if key_valid is not None:
        k_hash = k_hash.masked_fill(~key_valid[:, None, :, None], float("inf"))
    return q_hash.reshape(batch, heads, n_q, n_rounds).transpose(-1, -2), k_hash.transpose(-1, -2), None


def _lsh_plan_by_key_position(q_hash, k_hash, k_order, bucket_size, n_buckets, real_buckets, kv_heads, n_q, n_k):
    """Few queries: query i attends the key bucket containing its hash's position among the sorted
    key hashes of its key/value head. Tiles are the key buckets; tile t lists the queries of bucket t."""
    batch, heads, n_rounds, _ = q_hash.shape
    group = heads // kv_heads
    k_sorted = k_hash.gather(-1, k_order).contiguous()  # (B, Hkv, R, S), padded keys (+inf) last
    grouped = q_hash.reshape(batch, kv_heads, group, n_rounds, n_q).transpose(2, 3)
    pos = torch.searchsorted(k_sorted, grouped.reshape(batch, kv_heads, n_rounds, group * n_q).contiguous())
    last = (real_buckets.clamp_min(1) - 1) if real_buckets is not None else torch.full(
        (batch,), n_buckets - 1, device=q_hash.device)
    bucket = torch.minimum(torch.div(pos, bucket_size, rounding_mode="floor"), last[:, None, None, None])
    q_bucket = bucket.reshape(batch, kv_heads, n_rounds, group, n_q).transpose(2, 3).reshape(
        batch, heads, n_rounds, n_q)
    tiles = torch.arange(n_buckets, device=q_hash.device)[:, None]
    positions = torch.arange(n_q, device=q_hash.device)
    q_index = torch.where(q_bucket.unsqueeze(-2) == tiles, positions, n_q)  # (B, H, R, T, N)
    k_index = _pad_last(k_order, n_buckets * bucket_size, n_k).reshape(batch, kv_heads, n_rounds, n_buckets, bucket_size)
    return SparsePlan(
        q_index=q_index,
        k_index=k_index,
        num_queries=n_q,
        num_keys=n_k,
        q_bucket=q_bucket if n_rounds > 1 else None,  # only deduplication reads them
        k_bucket=_ranks_to_buckets(k_order, bucket_size) if n_rounds > 1 else None,
    )


def _pad_last(order: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    pad = length - order.shape[-1]
    if pad == 0:
        return order
    filler = torch.full((*order.shape[:-1], pad), fill, dtype=order.dtype, device=order.device)
    return torch.cat([order, filler], dim=-1)


def _ranks_to_buckets(order: torch.Tensor, chunk: int) -> torch.Tensor:
    """bucket[..., order[..., p]] = p // chunk: the bucket of each position, from the sort order."""
    buckets = torch.div(torch.arange(order.shape[-1], device=order.device), chunk, rounding_mode="floor")
    return torch.empty_like(order).scatter_(-1, order, buckets.expand_as(order))


def local_plan(
    num_queries: int, num_keys: int, *, window: int, device: torch.device, block: int = 64
) -> SparsePlan:
    """Local window support |i - j| <= window // 2 (positions compared as they are).

    Query tiles are contiguous blocks of `block` positions; each tile's keys are the band
    [start - h, start + block - 1 + h], h = window // 2, and the plan's `band` keeps |i - j| <= h.
    The plan depends only on its arguments, so the last 16 built in plain eager mode are kept and
    returned again (the same tensors, which nothing writes to): an eager call then makes no device
    work for it, where building it takes some fifteen small ops. Under torch.compile or a dispatch mode (FakeTensorMode, make_fx) plans are built afresh and
    not kept; in inference mode or during CUDA-graph capture they are used if kept, not stored.
    """
    key = (num_queries, num_keys, window, torch.device(device), block)
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return _build_local_plan(*key)
    with _KEPT_LOCAL_PLANS_LOCK:
        plan = _KEPT_LOCAL_PLANS.get(key)
        if plan is not None:
            _KEPT_LOCAL_PLANS.move_to_end(key)
            return plan
    plan = _build_local_plan(*key)
    if torch.is_inference_mode_enabled() or (key[3].type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return plan  # inference tensors cannot be saved for backward; a capture does not run its ops
    with _KEPT_LOCAL_PLANS_LOCK:
        _KEPT_LOCAL_PLANS[key] = plan
        if len(_KEPT_LOCAL_PLANS) > 16:
            _KEPT_LOCAL_PLANS.popitem(last=False)
    return plan


_KEPT_LOCAL_PLANS: collections.OrderedDict = collections.OrderedDict()
_KEPT_LOCAL_PLANS_LOCK = threading.Lock()  # (threads serving different shapes share the kept plans)


def _build_local_plan(num_queries: int, num_keys: int, window: int, device: torch.device, block: int) -> SparsePlan:
    half = window // 2
    tq = max(1, min(block, num_queries))
    n_tiles = math.ceil(num_queries / tq)
    q_pos = torch.arange(n_tiles * tq, device=device).reshape(n_tiles, tq)
    q_index = torch.where(q_pos < num_queries, q_pos, torch.full_like(q_pos, num_queries))
    if tq + 2 * half >= num_keys:  # the band spans every key: one key list for all tiles
        k_index = torch.arange(num_keys, device=device).expand(n_tiles, num_keys)
    else:
        starts = torch.arange(n_tiles, device=device) * tq - half
        k_pos = starts[:, None] + torch.arange(tq + 2 * half, device=device)
        inside = (k_pos >= 0) & (k_pos < num_keys)
        k_index = torch.where(inside, k_pos, torch.full_like(k_pos, num_keys))
    return SparsePlan(
        q_index=q_index.reshape(1, 1, 1, n_tiles, tq),
        k_index=k_index.reshape(1, 1, 1, n_tiles, k_index.shape[-1]),
        num_queries=num_queries,
        num_keys=num_keys,
        band=half,
    )
