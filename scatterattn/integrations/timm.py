"""timm Vision Transformers with Scatterbrain attention.

`ScatterbrainTimmAttention` has the constructor signature and the parameter names of timm's
``timm.layers.Attention`` (re-exported as ``timm.models.vision_transformer.Attention``): ``qkv``,
``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``, so timm's
pretrained weights load into it unchanged (its random features are extra buffers that a
checkpoint without them leaves as they are). It does not import timm.

Three ways in:

* build: ``timm.create_model(name, attn_layer=scatterbrain_attn_layer(num_features=64, bucket_size=32))``
  or ``VisionTransformer(..., attn_layer=...)`` (timm >= 1.0 passes ``attn_layer`` to every Block);
* swap an already-built model (weights shared, not copied): ``swap_timm_attention(model, ...)``, or
  the generic `scatterattn.integrations.swap_attention`;
* undo: ``restore_timm_attention(model)`` / `scatterattn.integrations.restore_attention`.

Forward: ``forward(x, attn_mask=None, is_causal=False)`` as timm's; a non-None ``attn_mask`` raises
(Scatterbrain supports no arbitrary mask), and so does attention dropout in training mode unless
the layer is "exact".
"""

from __future__ import annotations

import itertools
from typing import Optional, Type

import torch
from torch import nn

from ._common import (
    EXACT, LayerSpec, check_attention_dropout, core_dropout, describe, make_core, merge_settings, model_device,
    resolve_spec,
)


class ScatterbrainTimmAttention(nn.Module):
    """Drop-in for timm's vision-transformer ``Attention`` computed with Scatterbrain attention.

    Keyword-only extras: ``scatterbrain`` (ScatterbrainConfig, dict of its fields, "exact" or None),
    ``seed`` (None: drawn from torch's global RNG, so ``torch.manual_seed`` fixes it; saved in the
    state_dict either way), ``redraw_interval``, ``backend``.
    """

    default_spec: LayerSpec = None
    default_seed: int | None = None
    default_redraw_interval: int | None = None
    default_backend: str = "auto"
    default_attention_dropout: str = "error"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
        *,
        scatterbrain: LayerSpec = None,
        seed: int | None = None,
        redraw_interval: int | None = None,
        backend: str | None = None,
        attention_dropout: str | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be provided if qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        spec = scatterbrain if scatterbrain is not None else type(self).default_spec
        self.spec = resolve_spec(spec)
        if seed is None:
            seed = type(self)._next_seed()
        core_device = None if device is None or torch.device(device).type == "meta" else device
        self.scatterbrain = make_core(
            self.spec,
            head_dim,
            seed=seed,
            redraw_interval=redraw_interval if redraw_interval is not None else type(self).default_redraw_interval,
            backend=backend or type(self).default_backend,
            device=core_device,
            attention_dropout=attention_dropout or type(self).default_attention_dropout,
        )

    @classmethod
    def _next_seed(cls) -> int | None:
        counter = cls.__dict__.get("_seed_counter")
        if cls.default_seed is None or counter is None:
            return None
        return cls.default_seed + next(counter)

    @classmethod
    def from_timm(
        cls,
        attn: nn.Module,
        scatterbrain: LayerSpec = None,
        *,
        seed: int | None = None,
        redraw_interval: int | None = None,
        backend: str = "auto",
        attention_dropout: str = "error",
    ) -> "ScatterbrainTimmAttention":
        """A ScatterbrainTimmAttention sharing the submodules (and so the weights) of timm's `attn`."""
        if not is_timm_attention(attn):
            raise TypeError(f"expected timm's vision-transformer Attention, got {type(attn).__module__}.{type(attn).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = attn.num_heads
        new.head_dim = attn.head_dim
        new.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        new.scale = attn.scale
        for name in _TIMM_CHILDREN:
            child = getattr(attn, name, None)
            if child is None and name in ("q_norm", "k_norm", "norm"):
                child = nn.Identity()
            setattr(new, name, child)
        new.spec = resolve_spec(scatterbrain)
        new.scatterbrain = make_core(
            new.spec, new.head_dim, seed=seed, redraw_interval=redraw_interval, backend=backend,
            device=model_device(attn), attention_dropout=attention_dropout,
        )
        new.train(attn.training)
        return new

    def describe(self) -> str:
        return describe(self.spec)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError(
                f"{type(self).__name__} supports attn_mask=None only (use is_causal=True for causal attention); "
                f"got a mask of shape {tuple(attn_mask.shape)}. Arbitrary masks are not supported by Scatterbrain attention"
            )
        p = core_dropout(self.scatterbrain, self.attn_drop.p if self.training else 0.0, type(self).__name__)
        batch, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        kwargs = {"dropout_p": p} if p else {}
        x = self.scatterbrain(q, k, v, scale=self.scale, is_causal=is_causal, **kwargs)
        x = x.transpose(1, 2).reshape(batch, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


def scatterbrain_attn_layer(
    config: LayerSpec = None,
    *,
    seed: int | None = None,
    redraw_interval: int | None = None,
    backend: str = "auto",
    attention_dropout: str = "error",
    **settings,
) -> type[ScatterbrainTimmAttention]:
    """A `ScatterbrainTimmAttention` subclass with these defaults, for timm's ``attn_layer=`` hook.

    timm passes only its own arguments to ``attn_layer``, so the settings are bound into a class
    (a ``functools.partial`` would not do: timm calls ``issubclass`` on it). With ``seed`` given,
    the layers built from this class get seeds ``seed, seed + 1, ...`` in construction order;
    with None each draws its seed from torch's global RNG. attention_dropout: "error" or "ignore"
    (train Scatterbrain layers without the model's attention dropout; "exact" layers apply it).
    """
    check_attention_dropout(attention_dropout)
    spec = merge_settings(config, settings)
    attrs = {
        "default_spec": spec,
        "default_seed": seed,
        "default_redraw_interval": redraw_interval,
        "default_backend": backend,
        "default_attention_dropout": attention_dropout,
        "_seed_counter": itertools.count() if seed is not None else None,
        "__module__": __name__,
    }
    return type("ConfiguredScatterbrainTimmAttention", (ScatterbrainTimmAttention,), attrs)


_TIMM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")


def is_timm_attention(module: nn.Module) -> bool:
    """True for timm's plain vision-transformer Attention (not its RoPE / diff / pooling variants):
    a timm class named Attention whose children are among those `ScatterbrainTimmAttention` takes
    over (qkv and proj: nn.Linear or a wrapper of one, as LoRA or quantization make; not convolutions,
    as in Visformer), with no parameters or buffers of its own (BEiT's q/v biases and
    relative-position tables, SAM's rel_pos, ... would be lost) and num_heads / head_dim / scale."""
    cls = type(module)
    if cls.__name__ != "Attention" or cls.__module__.split(".")[0] != "timm":
        return False
    children = dict(module.named_children())
    projections = [children.get(name) for name in ("qkv", "proj")]  # Linear, or a wrapper (LoRA, quantized)
    return (all(layer is not None and not any(isinstance(m, nn.modules.conv._ConvNd) for m in layer.modules())
                for layer in projections)
            and set(children) <= set(_TIMM_CHILDREN)
            and not any(True for _ in module.parameters(recurse=False))
            and not any(True for _ in module.buffers(recurse=False))
            and all(hasattr(module, name) for name in ("num_heads", "head_dim", "scale")))


def swap_timm_attention(model: nn.Module, config: LayerSpec = None, **kwargs):
    """Replace every timm vision-transformer Attention of `model`; see `swap_attention`."""
    from .swap import swap_attention

    return swap_attention(model, config, kinds=("timm",), **kwargs)


def restore_timm_attention(model: nn.Module):
    """Undo `swap_timm_attention`; see `restore_attention`."""
    from .swap import restore_attention

    return restore_attention(model, kinds=("timm",))


__all__ = [
    "EXACT",
    "ScatterbrainTimmAttention",
    "is_timm_attention",
    "restore_timm_attention",
    "scatterbrain_attn_layer",
    "swap_timm_attention",
]
