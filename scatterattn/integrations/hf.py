"""Hugging Face transformers (>= 5) with Scatterbrain attention.

Importing this module registers, with transformers' attention interface and mask interface,

* ``"scatterbrain"``: Scatterbrain attention (`scatterbrain_attention_forward`);
* ``"scatterbrain_lowrank_grad"``: exact forward, approximate chained low-rank gradient, through
  ``scatterattn.lora.chained_lowrank_attention``. It receives ``scale``, ``is_causal``,
  ``key_padding_mask`` and the keyword arguments in the attention module's
  ``scatterbrain_lowrank_kwargs`` dict attribute, if any (e.g. ``{"num_features": 128}``, or
  ``{"sparse": "local", "window": 64}`` for the sparse-corrected tier).

Then any model whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen,
BERT, RoBERTa, ...) runs with it:

    import scatterattn.integrations.hf as sb_hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="scatterbrain")
    # or: model.set_attn_implementation("scatterbrain")
    sb_hf.configure(model, default=ScatterbrainConfig(num_features=128, bucket_size=64),
                    per_layer={0: "exact", 1: "exact"})    # keep the first layers exact

Settings. `configure` attaches a child module ``scatterbrain`` to every attention module: an
`AttachedScatterbrain` (a `scatterattn.ScatterbrainAttention`: its random features are buffers, so
they are in ``state_dict``) or, for layers set to ``"exact"``, an `ExactAttention` (torch SDPA).
``per_layer`` keys are layer indices (the module's ``layer_idx``, else its position among the
model's attention modules) or module names. Without `configure`, the first forward creates each
layer's core with the default `ScatterbrainConfig()` and a seed fixed by the module's class and
``layer_idx`` (so the same model gives the same outputs run after run; modules without a
``layer_idx``, as in ViT or BART encoders, then share one seed per class: `configure` seeds each
layer by its position); that core then appears in ``state_dict``.
A checkpoint without the cores' buffers (the original model's) loads with ``strict=True``.
``save_pretrained`` saves the cores' buffers; ``from_pretrained`` reports them as unexpected keys
(the cores are attached after loading) -- `configure` with the same settings and seed draws the
same features again; after redraws (``redraw_interval``) configure first, then load the saved
state_dict with ``model.load_state_dict(..., strict=False)``.

Masks. The mask function registered under the same names hands the attention function either
None or a 2-D bool padding mask (B, L) (True = attend), as for flash-attention. Padding and
causality (from ``is_causal`` or the module's ``is_causal``) are supported; any other mask pattern
(sliding window, chunked attention, packed sequences, bidirectional image-token overlays, a
custom 4-D mask) raises NotImplementedError rather than being ignored. Attention dropout in
training raises unless the layer is "exact" or configured with ``attention_dropout="ignore"``;
``output_attentions=True``, ``softcap``, ``sliding_window``, attention sinks (``s_aux``) and
``position_bias`` raise too.

Decoding with a KV cache: transformers aligns causal masks bottom-right (query i sees keys
j <= i + S - N), the package's ``is_causal`` is top-left. One new token (N = 1) sees every cached
key, so no mask is needed; for 1 < N < S (chunked prefill, assisted decoding) the queries are
front-padded with S - N zero rows so that top-left alignment equals bottom-right, and the padding
rows are dropped (their cost is O(S), like the rest). With a static cache, keys past the written
length L (the padding mask's length) are dropped first.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
from transformers.modeling_utils import PreTrainedModel

from ..lora import chained_lowrank_attention
from ._common import (
    CORE_NAME,
    EXACT,
    AttachedScatterbrain,
    ExactAttention,
    LayerSpec,
    check_attention_dropout,
    core_dropout,
    describe,
    layer_setting,
    make_core,
    merge_settings,
    model_device,
    resolve_spec,
)

NAME = "scatterbrain"
LOWRANK_NAME = "scatterbrain_lowrank_grad"
_STATE_ATTR = "_scatterbrain_hf_state"
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "sliding_window": "sliding-window attention",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "additive position bias",
    "cu_seq_lens_q": "packed sequences (cu_seq_lens)",
    "cu_seq_lens_k": "packed sequences (cu_seq_lens)",
}


# ---------------------------------------------------------------------------------------------
# mask function


def scatterbrain_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask-interface function: None, or a (B, L) bool padding mask, True = attend, L <= kv_length.

    L < kv_length means only the first L key slots hold keys (a static cache being filled).
    """
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise NotImplementedError(
            "Scatterbrain attention supports key padding with full causal or bidirectional attention only; this "
            f"layer asks for another mask pattern ({name}: sliding window, chunked attention, packed sequences or "
            "a custom mask overlay). Use another attn_implementation for such layers."
        )
    if int(kv_offset) != 0:
        raise NotImplementedError(f"Scatterbrain attention does not support key offsets (kv_offset={int(kv_offset)})")
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                f"Scatterbrain attention takes a 2-D padding mask, got shape {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(torch.bool)
        if valid.shape[-1] > kv_length:
            raise ValueError(f"padding mask covers {valid.shape[-1]} keys but the layer has {kv_length}")
    else:
        n_valid = min(kv_length, int(q_offset) + q_length) if causal else kv_length
        if n_valid == kv_length:
            return None
        valid = torch.ones(batch_size, n_valid, dtype=torch.bool, device=kwargs.get("device"))
    if valid.shape[-1] == kv_length and bool(valid.all()):
        return None
    return valid


# ---------------------------------------------------------------------------------------------
# attention functions


def _check_kwargs(kwargs: Mapping[str, Any], where: str) -> None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{where}: {what} ({name}=...) is not supported by Scatterbrain attention")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{where}: output_attentions=True is not supported (the attention matrix is never formed)")


def _prepare(module, query, key, value, attention_mask, is_causal, where):
    """Padding mask, causality and query front-padding for the core's top-left convention."""
    n_q, n_k = query.shape[2], key.shape[2]
    causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
    key_padding_mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
            raise NotImplementedError(
                f"{where}: got an attention mask of shape {shape}; Scatterbrain attention supports only a 2-D "
                "padding mask (built by its registered mask function) and causality. A custom 4-D mask or a "
                "BlockMask cannot be honoured."
            )
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"{where}: the padding mask must be bool (True = attend), got {attention_mask.dtype}")
        n_valid = attention_mask.shape[1]
        if n_valid > n_k:
            raise ValueError(f"{where}: padding mask covers {n_valid} keys but there are {n_k}")
        if n_valid < n_k:  # static cache: slots past the written length hold no key yet
            if not causal:
                raise ValueError(f"{where}: a padding mask over {n_valid} of {n_k} keys in non-causal attention")
            key, value, n_k = key[:, :, :n_valid], value[:, :, :n_valid], n_valid
        key_padding_mask = ~attention_mask
    front = 0
    if causal:
        if n_q == 1:
            causal = False  # a single new token sees every key (bottom-right alignment)
        elif n_q < n_k:
            front = n_k - n_q
        elif n_q > n_k:
            raise ValueError(f"{where}: causal attention with more queries ({n_q}) than keys ({n_k})")
    if front:
        query = torch.cat([query.new_zeros(*query.shape[:2], front, query.shape[3]), query], dim=2)
    return query, key, value, key_padding_mask, causal, front


def _layer_index(module: nn.Module, fallback: int) -> int:
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else fallback


def _default_seed(module: nn.Module) -> int:
    return zlib.crc32(f"{type(module).__name__}/{_layer_index(module, 0)}".encode())


def _get_core(module: nn.Module, query: torch.Tensor) -> nn.Module:
    core = module._modules.get(CORE_NAME)
    if core is None:
        pending = getattr(module, "_scatterbrain_pending", None) or {}
        with torch.inference_mode(False):  # a first call under inference_mode must not leave inference buffers
            core = make_core(
                pending.get("spec", resolve_spec(None)),
                query.shape[-1],
                seed=pending.get("seed", _default_seed(module)),
                redraw_interval=pending.get("redraw_interval"),
                backend=pending.get("backend", "auto"),
                device=query.device,
                attention_dropout=pending.get("attention_dropout",  # (older pickles: ignore_dropout)
                                              "ignore" if pending.get("ignore_dropout") else "error"),
            )
        setattr(module, CORE_NAME, core)
    if isinstance(core, AttachedScatterbrain) and core.head_dim != query.shape[-1]:
        raise ValueError(
            f"{type(module).__name__}: the attached Scatterbrain core has head_dim {core.head_dim} but the queries "
            f"have {query.shape[-1]}"
        )
    return core


def scatterbrain_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: q (B, H, N, D), k/v (B, Hkv, S, D) -> ((B, N, H, Dv), None)."""
    where = type(module).__name__
    _check_kwargs(kwargs, where)
    core = _get_core(module, query)
    p = core_dropout(core, dropout, where)
    extra = {"dropout_p": p} if p else {}
    return _attend(core, module, query, key, value, attention_mask, scaling, is_causal, where, **extra)


def lowrank_grad_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function for "scatterbrain_lowrank_grad" (see the module docstring)."""
    where = type(module).__name__
    _check_kwargs(kwargs, where)
    if dropout:
        raise ValueError(f"{where}: attention dropout (p={dropout}) is not supported by {LOWRANK_NAME}")
    settings = dict(getattr(module, "scatterbrain_lowrank_kwargs", {}) or {})
    return _attend(chained_lowrank_attention, module, query, key, value, attention_mask, scaling, is_causal, where,
                   **settings)


def _attend(attention, module, query, key, value, attention_mask, scaling, is_causal, where, **settings):
    """Masks and cache alignment (`_prepare`), then attention(q, k, v, scale=, is_causal=,
    key_padding_mask=, **settings); returns transformers' ((B, N, H, Dv), None)."""
    n_q = query.shape[2]
    query, key, value, key_padding_mask, causal, front = _prepare(
        module, query, key, value, attention_mask, is_causal, where
    )
    out = attention(
        query, key, value, scale=None if scaling is None else float(scaling), is_causal=causal,
        key_padding_mask=key_padding_mask, **settings,
    )
    if front:
        out = out[:, :, front:]
    assert out.shape[2] == n_q
    return out.transpose(1, 2).contiguous(), None


def register() -> list[str]:
    """Register the attention and mask functions; returns the names registered. Idempotent."""
    AttentionInterface.register(NAME, scatterbrain_attention_forward)
    AttentionMaskInterface.register(NAME, scatterbrain_mask)
    AttentionInterface.register(LOWRANK_NAME, lowrank_grad_attention_forward)
    AttentionMaskInterface.register(LOWRANK_NAME, scatterbrain_mask)
    return [NAME, LOWRANK_NAME]


REGISTERED = register()


# ---------------------------------------------------------------------------------------------
# configuration


_USES_INTERFACE: dict[type, bool] = {}


def _uses_attention_interface(cls: type) -> bool:
    if cls not in _USES_INTERFACE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _USES_INTERFACE[cls]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules that call transformers' attention interface, in model order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if not isinstance(m, PreTrainedModel) and _uses_attention_interface(type(m))
    ]


def _head_dim(module: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    if config is not None:
        value = getattr(config, "head_dim", None)
        if isinstance(value, int) and value > 0:
            return value
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
            return hidden // heads
    return None


def configure(
    model: nn.Module,
    default: LayerSpec = None,
    per_layer: Mapping[int | str, LayerSpec] | None = None,
    *,
    seed: int = 0,
    redraw_interval: int | None = None,
    backend: str = "auto",
    attention_dropout: str = "error",
    set_implementation: bool = True,
    **settings,
) -> list[tuple[str, str]]:
    """Attach a configured attention core to every attention module of `model`.

    default: the setting of layers not in `per_layer` (ScatterbrainConfig, dict, "exact" or None);
    keyword `settings` (ScatterbrainConfig fields) apply on top of it.
    per_layer: {layer index or module name: setting; a dict of fields applies on top of the default
    setting}; a layer index is the module's ``layer_idx``
    (or its position among the attention modules when it has none) and selects every attention
    module with that index (self- and cross-attention of a layer). Unknown keys raise.
    seed: layer i (its position among the attention modules) gets seed ``seed + i``.
    attention_dropout: "error" (default) raises when a Scatterbrain layer is asked for attention
    dropout in training; "ignore" trains those layers without it ("exact" layers apply it).
    set_implementation: also call ``model.set_attn_implementation("scatterbrain")``.

    Returns [(module name, description)] of the configured modules. Call again to re-configure;
    `unconfigure` undoes it.
    """
    check_attention_dropout(attention_dropout)
    base = merge_settings(default, settings)
    per_layer = dict(per_layer or {})
    for key, spec in per_layer.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"per_layer keys must be layer indices (int) or module names (str), got {key!r}")
        per_layer[key] = layer_setting(base, spec)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention module that calls transformers' ALL_ATTENTION_FUNCTIONS; "
            "Scatterbrain cannot be plugged into it"
        )
    used = set()
    plan = []
    for position, (name, module) in enumerate(modules):
        index = _layer_index(module, position)
        if name in per_layer:
            spec, used_key = per_layer[name], name
        elif index in per_layer:
            spec, used_key = per_layer[index], index
        else:
            spec, used_key = base, None
        used.add(used_key)
        existing = module._modules.get(CORE_NAME)
        if existing is not None and not isinstance(existing, (AttachedScatterbrain, ExactAttention)):
            raise ValueError(f"{name} already has a child module named {CORE_NAME!r} that is not a Scatterbrain core")
        plan.append((position, name, module, spec))
    unknown = [key for key in per_layer if key not in used]
    if unknown:  # checked before anything changes
        raise ValueError(
            f"per_layer keys {unknown} match no attention module; layer indices: "
            f"{sorted({_layer_index(m, i) for i, (_, m) in enumerate(modules)})}, names: {[n for n, _ in modules]}"
        )
    report = []
    device = model_device(model)
    for position, name, module, spec in plan:
        existing = module._modules.get(CORE_NAME)
        head_dim = _head_dim(module)
        if head_dim is None:  # created at the first forward, from the query's head_dim
            if existing is not None:
                delattr(module, CORE_NAME)
            module._scatterbrain_pending = {
                "spec": spec,
                "seed": seed + position,
                "redraw_interval": redraw_interval,
                "backend": backend,
                "attention_dropout": attention_dropout,
            }
        else:
            core = make_core(spec, head_dim, seed=seed + position, redraw_interval=redraw_interval, backend=backend,
                             device=device, attention_dropout=attention_dropout)
            setattr(module, CORE_NAME, core)
        report.append((name, describe(spec)))
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        model.__dict__[_STATE_ATTR] = {"previous": current_implementation(model)}
    if set_implementation:
        set_implementation_on(model, NAME)
    return report


def current_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def set_implementation_on(model: nn.Module, name: str) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"set_attn_implementation needs a transformers PreTrainedModel, got {type(model).__name__}")
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"{type(model).__name__} refused attn_implementation={name!r} (it does not dispatch through "
            "transformers' AttentionInterface)"
        )


def is_configured(model: nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def unconfigure(model: nn.Module) -> list[str]:
    """Remove the cores `configure` attached and restore the attention implementation it replaced."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not configured with scatterattn.integrations.hf.configure")
    removed = []
    for name, module in attention_modules(model):
        if CORE_NAME in module._modules:
            delattr(module, CORE_NAME)
            removed.append(name)
        module.__dict__.pop("_scatterbrain_pending", None)
    previous = state["previous"]
    if previous is not None and previous != current_implementation(model):
        model.set_attn_implementation(previous)
    return removed


def is_hf_model(module: nn.Module) -> bool:
    return isinstance(module, PreTrainedModel)


__all__ = [
    "LOWRANK_NAME",
    "NAME",
    "EXACT",
    "attention_modules",
    "configure",
    "is_configured",
    "lowrank_grad_attention_forward",
    "register",
    "scatterbrain_attention_forward",
    "scatterbrain_mask",
    "unconfigure",
]
