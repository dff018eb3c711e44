"""Diagnostics for small inputs: which pairs are exact, the implied attention matrix, the error.

These build (B, H, N, S) tensors on purpose: use them to inspect an approximation on a few thousand
tokens at most. Settings are the keyword arguments of `scatterbrain_attention` (num_features,
sparse, bucket_size, n_hashes, window, seed, feature_matrix, ...).
"""

from __future__ import annotations

import math

import torch

from . import reference
from .functional import PreparedAttention, dense_attention, prepare_call, run_prepared


def _support_from_prepared(query, key, prepared: PreparedAttention) -> torch.Tensor:
    batch, heads, n_q, dim = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    group = heads // kv_heads
    support = torch.zeros(batch, kv_heads, group, (n_q + 1) * (n_k + 1), device=query.device)
    if prepared.plan is not None:
        q = query.detach().float().reshape(batch, kv_heads, group, n_q, dim)
        tiles = reference.SparseTiles(
            q, key.detach().float(), prepared.plan, is_causal=prepared.is_causal, key_valid=prepared.key_valid
        )
        pair = tiles.q_pos.unsqueeze(-1) * (n_k + 1) + tiles.k_pos.unsqueeze(-2)
        pair = pair.expand(tiles.mask.shape)
        support.scatter_add_(-1, pair.flatten(3), tiles.mask.flatten(3).float())
    support = support.reshape(batch, kv_heads, group, n_q + 1, n_k + 1)[..., :n_q, :n_k] > 0
    return support.reshape(batch, heads, n_q, n_k)


def attention_support(query: torch.Tensor, key: torch.Tensor, **settings) -> torch.Tensor:
    """(B, H, N, S) bool: the pairs Scatterbrain computes exactly (after masks and deduplication)."""
    prepared = prepare_call(query, key, key, **settings)
    return _support_from_prepared(query, key, prepared)


def implied_attention(query: torch.Tensor, key: torch.Tensor, **settings) -> torch.Tensor:
    """(B, H, N, S): the row-normalised matrix A^ that Scatterbrain applies to V.

    Built densely and independently of the reference's stabilisers: logits are s_ij on the support
    and log(phi(q~_i) . phi(k~_j)) = logsumexp_f(w_f.q~_i - |q~_i|^2/2 + w_f.k~_j - |k~_j|^2/2) - log m
    elsewhere; masked pairs are -inf; then a row softmax. Rows with no key at all are zeros.
    Memory O(N S m): small inputs only.
    """
    return _implied_from_prepared(query, key, prepare_call(query, key, key, **settings))


def _implied_from_prepared(query, key, prepared: PreparedAttention) -> torch.Tensor:
    support = _support_from_prepared(query, key, prepared)
    batch, heads, n_q, dim = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    cd = reference.compute_dtype(query.dtype)
    root_scale = math.sqrt(prepared.scale)
    q = query.to(cd) * root_scale
    k = (key.to(cd) * root_scale).repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.full((batch, heads, n_q, n_k), float("-inf"), dtype=cd, device=query.device)
    w = prepared.feature_matrix
    if w is not None:
        w = w.to(cd)
        q_feat = q @ w.t() - 0.5 * (q * q).sum(-1, keepdim=True)
        k_feat = k @ w.t() - 0.5 * (k * k).sum(-1, keepdim=True)
        logits = torch.logsumexp(q_feat.unsqueeze(-2) + k_feat.unsqueeze(-3), dim=-1) - math.log(w.shape[0])
    scores = q @ k.transpose(-1, -2)
    logits = torch.where(support, scores, logits)
    allowed = reference._dense_allowed(batch, n_q, n_k, prepared.is_causal, prepared.key_valid, query.device)
    logits = logits.masked_fill(~allowed.squeeze(2), float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)
    return weights / reference._safe_den(weights.sum(-1, keepdim=True))


def approximation_error(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **settings) -> dict:
    """Errors of the approximation against dense softmax attention.

    Returns a dict: output_rel_error (||O^ - O||_F / ||O||_F), output_max_abs_error, and, when N*S is
    at most 2^22, attention_rel_error (||A^ - A||_F / ||A||_F) and support_fraction (exact pairs over
    allowed pairs).
    """
    backend = settings.pop("backend", "auto")
    prepared = prepare_call(query, key, value, **settings)
    approx = run_prepared(query, key, value, prepared, backend).double()
    exact = dense_attention(
        query,
        key,
        value,
        scale=prepared.scale,
        is_causal=prepared.is_causal,
        key_padding_mask=None if prepared.key_valid is None else ~prepared.key_valid,
    ).double()
    result = {
        "output_rel_error": float((approx - exact).norm() / exact.norm().clamp_min(1e-300)),
        "output_max_abs_error": float((approx - exact).abs().max()),
    }
    n_q, n_k = query.shape[2], key.shape[2]
    if n_q * n_k <= 1 << 22:
        implied = _implied_from_prepared(query, key, prepared)
        batch, heads = query.shape[:2]
        ones = torch.eye(n_k, dtype=query.dtype, device=query.device).expand(batch, key.shape[1], n_k, n_k)
        dense_matrix = dense_attention(
            query,
            key,
            ones,
            scale=prepared.scale,
            is_causal=prepared.is_causal,
            key_padding_mask=None if prepared.key_valid is None else ~prepared.key_valid,
        ).double()
        result["attention_rel_error"] = float(
            (implied.double() - dense_matrix).norm() / dense_matrix.norm().clamp_min(1e-300)
        )
        support = _support_from_prepared(query, key, prepared)
        allowed = reference._dense_allowed(batch, n_q, n_k, prepared.is_causal, prepared.key_valid, query.device)
        allowed = allowed.squeeze(2).expand(batch, heads, n_q, n_k)
        result["support_fraction"] = float(support.sum() / allowed.sum().clamp_min(1))
    return result
