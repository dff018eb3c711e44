"""Drop-in Scatterbrain attention for existing models.

    from scatterattn.integrations import swap_attention, restore_attention
    report = swap_attention(model, num_features=128, bucket_size=64, per_layer={0: "exact"})
    print(report)              # which modules were replaced, and by what
    restore_attention(model)   # back to the original attention

* `swap_attention` / `restore_attention` (`.swap`): transformers models, timm vision-transformer
  ``Attention`` and ``torch.nn.MultiheadAttention``.
* `.hf`: the "scatterbrain" attention implementation for transformers >= 5 (registered when
  ``scatterattn.integrations.hf`` is imported; `swap_attention` imports it when transformers is in
  use) and `hf.configure` for per-model / per-layer settings.
* `.timm`: `ScatterbrainTimmAttention` (timm's parameter names; usable as ``attn_layer=`` through
  `scatterbrain_attn_layer`); timm itself is not imported.
* `.mha`: `ScatterbrainMultiheadAttention`, a subclass of ``nn.MultiheadAttention``.

Per-layer settings everywhere: a `ScatterbrainConfig`, a dict of its fields, ``"exact"`` (exact
softmax attention through torch SDPA) or None (defaults). Only key padding and causal masks are
supported; any other mask raises a clear error instead of being ignored.

`ensure_torchvision_importable` (`._compat`) works around a torchvision wheel whose compiled
operators do not match torch (which otherwise makes timm and transformers' model classes fail to
import); the package never calls it by itself.
"""

from ._common import EXACT, AttachedScatterbrain, ExactAttention, LayerSpec, resolve_spec
from ._compat import ensure_torchvision_importable
from .mha import ScatterbrainMultiheadAttention
from .swap import SwapEntry, SwapReport, restore_attention, swap_attention
from .timm import ScatterbrainTimmAttention, restore_timm_attention, scatterbrain_attn_layer, swap_timm_attention

__all__ = [
    "EXACT",
    "AttachedScatterbrain",
    "ExactAttention",
    "LayerSpec",
    "ScatterbrainMultiheadAttention",
    "ScatterbrainTimmAttention",
    "SwapEntry",
    "SwapReport",
    "ensure_torchvision_importable",
    "resolve_spec",
    "restore_attention",
    "restore_timm_attention",
    "scatterbrain_attn_layer",
    "swap_attention",
    "swap_timm_attention",
]
