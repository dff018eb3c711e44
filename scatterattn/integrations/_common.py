"""Pieces shared by the integrations: per-layer settings, the attached attention cores.

A layer's setting (`LayerSpec`) is one of
  * a `ScatterbrainConfig` (or a dict of its fields): Scatterbrain attention with those settings;
  * the string ``"exact"``: exact softmax attention (torch's scaled_dot_product_attention);
  * None: the default `ScatterbrainConfig()`.

Each swapped or configured attention layer gets a child module named ``scatterbrain`` (the
"core"): an `AttachedScatterbrain` (a `ScatterbrainAttention`, so its random features are buffers in
the model's state_dict) or an `ExactAttention`. Both take ``(q, k, v, *, scale, is_causal,
key_padding_mask)`` with q (B, H, N, D), k/v (B, Hkv, S, D) and return (B, H, N, Dv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ScatterbrainConfig
from ..functional import validate_qkv
from ..modules import ScatterbrainAttention

EXACT = "exact"
LayerSpec = Union[ScatterbrainConfig, Mapping[str, Any], str, None]
CORE_NAME = "scatterbrain"

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ScatterbrainConfig))


def resolve_spec(spec: LayerSpec) -> ScatterbrainConfig | str:
    """A `ScatterbrainConfig` or ``"exact"``; raises a clear error for anything else."""
    if spec is None:
        return ScatterbrainConfig()
    if isinstance(spec, ScatterbrainConfig):
        return spec
    if isinstance(spec, str):
        if spec == EXACT:
            return EXACT
        raise ValueError(f"a layer setting given as a string must be 'exact', got {spec!r}")
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_CONFIG_FIELDS))
        if unknown:
            raise TypeError(f"unknown Scatterbrain setting(s) {unknown}; known: {list(_CONFIG_FIELDS)}")
        return ScatterbrainConfig(**spec)
    raise TypeError(
        "a layer setting must be a ScatterbrainConfig, a dict of its fields, 'exact' or None, "
        f"got {type(spec).__name__}"
    )


def merge_settings(config: LayerSpec, settings: Mapping[str, Any]) -> ScatterbrainConfig | str:
    """`config` with keyword `settings` (ScatterbrainConfig fields) applied on top."""
    resolved = resolve_spec(config)
    if not settings:
        return resolved
    if resolved == EXACT:
        raise ValueError(f"Scatterbrain settings {sorted(settings)} were given together with config='exact'")
    unknown = sorted(set(settings) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown Scatterbrain setting(s) {unknown}; known: {list(_CONFIG_FIELDS)}")
    return dataclasses.replace(resolved, **settings)


def layer_setting(base: ScatterbrainConfig | str, spec: LayerSpec) -> ScatterbrainConfig | str:
    """A per-layer setting: a dict of fields applies on top of the default setting `base` (when that
    is a ScatterbrainConfig: ``{"num_features": 32}`` changes only that); a ScatterbrainConfig,
    "exact" or None stands on its own (None: the library defaults)."""
    if isinstance(spec, Mapping) and isinstance(base, ScatterbrainConfig):
        return merge_settings(base, spec)
    return resolve_spec(spec)


def describe(spec: ScatterbrainConfig | str) -> str:
    if spec == EXACT:
        return "exact"
    c = spec
    parts = [f"features={c.num_features}" + ("x2" if c.feature_type == "hyperbolic" else "")]
    if c.sparse == "lsh":
        parts.append(f"lsh(bucket={c.bucket_size}, hashes={c.n_hashes})")
    elif c.sparse == "local":
        parts.append(f"local(window={c.window})")
    return "scatterbrain(" + ", ".join(parts) + ")"


class AttachedScatterbrain(ScatterbrainAttention):
    """`ScatterbrainAttention` that may be missing from a checkpoint.

    Loading a state_dict that has none of this module's entries (a checkpoint of the original,
    dense model) keeps the current random draws instead of reporting missing keys, so pretrained
    weights load unchanged with ``strict=True``. A state_dict that has them restores them.
    """

    ignore_dropout: bool = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class ExactAttention(nn.Module):
    """Exact softmax attention with the core's call convention (key padding, top-left causal,
    grouped-query heads), through torch's scaled_dot_product_attention. Rows with no visible key
    return zeros, as in `scatterattn.dense_attention`."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float | None = None,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        validate_qkv(query, key, value, key_padding_mask, scale)
        n_q, n_k = query.shape[2], key.shape[2]
        mask = None
        if key_padding_mask is not None:
            mask = (~key_padding_mask)[:, None, None, :]
            if is_causal:
                mask = mask & torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
                is_causal = False
        extra = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra
        )
        if mask is not None:
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return out

    def extra_repr(self) -> str:
        return "exact softmax attention"


def check_attention_dropout(value: str) -> None:
    """attention_dropout: "error" (a Scatterbrain layer asked for attention dropout in training raises)
    or "ignore" (it trains without; "exact" layers apply it)."""
    if value not in ("error", "ignore"):
        raise ValueError(f"attention_dropout must be 'error' or 'ignore', got {value!r}")


def make_core(
    spec: ScatterbrainConfig | str,
    head_dim: int,
    *,
    seed: int | None,
    redraw_interval: int | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    attention_dropout: str = "error",
) -> nn.Module:
    """The attention core for one layer: `ExactAttention` or an `AttachedScatterbrain`.
    attention_dropout: "error" or "ignore" (see `core_dropout`; exact layers apply dropout)."""
    check_attention_dropout(attention_dropout)
    if spec == EXACT:
        return ExactAttention()
    c = spec
    core = AttachedScatterbrain(
        head_dim,
        num_features=c.num_features,
        feature_type=c.feature_type,
        sparse=c.sparse,
        bucket_size=c.bucket_size,
        n_hashes=c.n_hashes,
        window=c.window,
        redraw_interval=redraw_interval,
        seed=seed,
        backend=backend,
    )
    core.ignore_dropout = attention_dropout == "ignore"
    if device is not None:
        core = core.to(device)
    return core


def core_dropout(core: nn.Module, p: float, where: str) -> float:
    """The dropout probability to pass to `core`, or a clear error when it cannot be applied."""
    if not p:
        return 0.0
    if isinstance(core, ExactAttention):
        return float(p)
    if getattr(core, "ignore_dropout", False):
        return 0.0
    raise ValueError(
        f"{where}: attention dropout (p={p}) cannot be applied by Scatterbrain attention, which never forms "
        "the attention matrix. Set the model's attention dropout to 0, run in eval mode, or build the layer "
        "with attention_dropout='ignore' (train without attention dropout; swap_attention, hf.configure, "
        "ScatterbrainMultiheadAttention, ScatterbrainTimmAttention and scatterbrain_attn_layer take it) or as 'exact'."
    )


def model_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None
