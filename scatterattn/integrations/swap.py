"""`swap_attention` / `restore_attention`: put Scatterbrain attention into a built model and take it out.

Supported (each found by walking ``model.named_modules()``):

* ``"hf"``: a transformers ``PreTrainedModel`` (the model itself or a submodule): its attention
  modules get configured cores and the model's attention implementation becomes "scatterbrain"
  (`scatterattn.integrations.hf.configure`); restore removes the cores and sets the previous
  implementation back.
* ``"timm"``: timm's vision-transformer ``Attention`` -> `ScatterbrainTimmAttention`.
* ``"mha"``: ``torch.nn.MultiheadAttention`` -> `ScatterbrainMultiheadAttention`.

Replaced modules share the original's parameters (the same Parameter objects, nothing is copied)
and its hooks (the same hook dictionaries: forward, backward and state-dict hooks registered on the
original before the swap, or on the replacement during it, act on whichever module is in place, and
their handles still remove them), and keep the original module object aside; restore puts the
original back with the current parameters, so training after the swap carries over. Errors instead
of silent no-ops: a model with none of the above raises; attention-like modules of other kinds (by
class name) are listed in the report and warned about, or raise with ``strict=True``.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ._common import LayerSpec, check_attention_dropout, describe, layer_setting, merge_settings
from .mha import ScatterbrainMultiheadAttention, is_plain_mha
from .timm import ScatterbrainTimmAttention, is_timm_attention

KINDS = ("hf", "timm", "mha")
_ORIGINAL = "_scatterbrain_original"
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class SwapEntry:
    name: str  # qualified module name ("" is the model itself)
    kind: str  # "hf", "timm" or "mha"
    before: str
    after: str


@dataclass
class SwapReport:
    """What `swap_attention` / `restore_attention` changed (`replaced`) and left alone (`skipped`)."""

    replaced: list[SwapEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)

    def __len__(self) -> int:
        return len(self.replaced)

    def __iter__(self):
        return iter(self.replaced)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.replaced]

    def __str__(self) -> str:
        rows = [("module", "kind", "before", "after")] + [(e.name or "<model>", e.kind, e.before, e.after) for e in self.replaced]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for name, reason in self.skipped:
            lines.append(f"skipped {name or '<model>'}: {reason}")
        return "\n".join(lines)


def _hf_module():
    """scatterattn.integrations.hf if transformers is in use (a model of it can only exist then)."""
    if "transformers" not in sys.modules:
        return None
    from . import hf

    return hf


def _is_under(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if name == "":
        raise ValueError(
            "the model itself is the attention module and cannot be replaced in place; use "
            "ScatterbrainMultiheadAttention.from_module(...) or ScatterbrainTimmAttention.from_timm(...)"
        )
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


# nn.Module's per-instance hook registries, shared between an original and its replacement
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_OWN_HOOKS = "_scatterbrain_own_hooks"


def _share_hooks(original: nn.Module, new: nn.Module) -> None:
    """Give `new` the hook registries of `original`: the same dict objects, so that a hook's handle
    removes it from both. The replacement's own hooks (ScatterbrainMultiheadAttention's pre-hook that
    keeps torch's fused encoder path off) join them until `_unshare_hooks`."""
    own = {}
    for attr in _HOOK_DICTS:
        if attr not in original.__dict__ or attr not in new.__dict__:
            continue
        shared, mine = original.__dict__[attr], new.__dict__[attr]
        shared.update(mine)  # handle ids are unique across modules
        own[attr] = list(mine)
        new.__dict__[attr] = shared
    if original.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = original.__dict__["_is_full_backward_hook"]
    new.__dict__[_OWN_HOOKS] = own


def _unshare_hooks(new: nn.Module, original: nn.Module) -> None:
    """Take the replacement's own hooks out of the registries it shared with its original, which
    keeps the hooks registered on the replacement meanwhile (full backward hooks need the flag that
    registering one sets on the module it was registered on)."""
    if new.__dict__.get("_is_full_backward_hook") is not None:
        original.__dict__["_is_full_backward_hook"] = new.__dict__["_is_full_backward_hook"]
    for attr, keys in new.__dict__.pop(_OWN_HOOKS, {}).items():
        shared = new.__dict__[attr]
        new.__dict__[attr] = type(shared)((key, shared.pop(key)) for key in keys if key in shared)


def _scan(model: nn.Module, kinds):
    hf = _hf_module()
    handled: list[str] = []
    targets: list[tuple[str, str, nn.Module]] = []
    suspects: list[tuple[str, str]] = []
    already: list[tuple[str, str]] = []
    for name, module in model.named_modules(remove_duplicate=False):  # a shared module at each place
        if _is_under(name, handled):
            continue
        if hf is not None and hf.is_hf_model(module):
            handled.append(name)
            if "hf" in kinds:
                targets.append(("hf", name, module))
            continue
        if isinstance(module, (ScatterbrainMultiheadAttention, ScatterbrainTimmAttention)):
            handled.append(name)
            already.append((name, f"already {type(module).__name__}"))
            continue
        kind = "mha" if is_plain_mha(module) else "timm" if is_timm_attention(module) else None
        if kind is not None and "forward" in module.__dict__:  # forward wrapped on the instance (e.g. accelerate)
            suspects.append((name, f"{type(module).__name__} with its forward replaced on the instance"))
            continue
        if kind is not None:
            handled.append(name)
            if kind in kinds:
                targets.append((kind, name, module))
            continue
        if _ATTENTION_NAME.search(type(module).__name__) or isinstance(module, nn.MultiheadAttention):
            suspects.append((name, type(module).__name__))
    target_names = [t[1] for t in targets] + [a[0] for a in already]
    suspects = [
        (n, c) for n, c in suspects if not any(t == n or t.startswith(n + ".") or n == "" for t in target_names)
    ]
    return targets, suspects, already


def swap_attention(
    model: nn.Module,
    config: LayerSpec = None,
    *,
    per_layer: Mapping[int | str, LayerSpec] | None = None,
    seed: int = 0,
    redraw_interval: int | None = None,
    backend: str = "auto",
    attention_dropout: str = "error",
    strict: bool = False,
    kinds: tuple[str, ...] = KINDS,
    **settings,
) -> SwapReport:
    """Replace the supported attention of `model` by Scatterbrain attention; returns a `SwapReport`.

    config: the default setting (ScatterbrainConfig, dict of its fields, "exact" or None for the
    defaults); keyword `settings` (ScatterbrainConfig fields, e.g. ``num_features=64``) apply on
    top of it. per_layer: {key: setting; a dict of fields applies on top of the default setting};
    a str key is a module name; an int key is a layer index
    for transformers models (the module's ``layer_idx``) and, for timm / nn.MultiheadAttention
    modules, their position in the swap order (``report.replaced``). Mixing int keys with both
    families in one model is ambiguous and raises. seed: module i gets ``seed + i``. A module object
    used at several places is replaced by one new module at all of them. Every replacement is built
    before the model changes, so a swap that raises leaves the model as it was. Modules that add to
    the supported classes (subclasses, pruned or parametrized modules, timm Attention variants with
    parameters of their own, a forward replaced on the instance) are left unchanged and reported, as
    other attention-like modules. A replacement shares the original's hooks (see the module docstring).
    attention_dropout: "error" or "ignore" (see `scatterattn.integrations.hf.configure`).
    strict: raise when other attention-like modules would be left unchanged (else warn).
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kinds {bad}; known: {list(KINDS)}")
    check_attention_dropout(attention_dropout)
    spec = merge_settings(config, settings)
    per_layer = {key: layer_setting(spec, value) for key, value in dict(per_layer or {}).items()}
    for key in per_layer:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"per_layer keys must be ints or module names, got {key!r}")
    targets, suspects, already = _scan(model, kinds)
    if not targets:
        what = "; found attention-like modules it does not support: " + ", ".join(
            f"{n or '<model>'} ({c})" for n, c in suspects
        ) if suspects else ""
        what += ("; already swapped: " + ", ".join(n or "<model>" for n, _ in already)) if already else ""
        raise ValueError(
            f"swap_attention found no supported attention module ({', '.join(kinds)}) in {type(model).__name__}"
            f"{what}. Supported: transformers PreTrainedModel (AttentionInterface), timm vision-transformer "
            "Attention, torch.nn.MultiheadAttention."
        )
    report = SwapReport(skipped=list(already))
    if suspects:
        listing = ", ".join(f"{n} ({c})" for n, c in suspects)
        if strict:
            raise ValueError(f"swap_attention(strict=True): unsupported attention-like modules would stay unchanged: {listing}")
        warnings.warn(f"swap_attention leaves these attention-like modules unchanged (unsupported): {listing}", stacklevel=2)
        report.skipped.extend((n, f"unsupported attention-like module {c}, left unchanged") for n, c in suspects)

    hf_targets = [t for t in targets if t[0] == "hf"]
    module_targets = [t for t in targets if t[0] != "hf"]
    int_keys = [k for k in per_layer if isinstance(k, int)]
    if int_keys and hf_targets and module_targets:
        raise ValueError(
            f"per_layer int keys {int_keys} are ambiguous in a model with both transformers attention and "
            "timm / nn.MultiheadAttention modules; use module names"
        )
    # Settle every module's setting and check the keys before changing anything.
    used: set = set()
    module_plan = []
    for position, (kind, name, module) in enumerate(module_targets):
        if name == "":
            _set_submodule(model, name, module)  # raises: the model itself cannot be replaced in place
        if name in per_layer:
            layer_spec = per_layer[name]
            used.add(name)
        elif position in per_layer:
            layer_spec = per_layer[position]
            used.add(position)
        else:
            layer_spec = spec
        module_plan.append((position, kind, name, module, layer_spec))
    hf_plan = []
    for _, name, hf_model in hf_targets:
        prefix = name + "." if name else ""
        own = {k[len(prefix):]: v for k, v in per_layer.items() if isinstance(k, str) and k.startswith(prefix)}
        own.update({k: v for k, v in per_layer.items() if isinstance(k, int)})
        used.update(prefix + k if isinstance(k, str) else k for k in own)
        hf_plan.append((prefix, name, hf_model, own))
    unknown = [k for k in per_layer if k not in used]
    if unknown:
        raise ValueError(
            f"per_layer keys {unknown} match no swappable module; swappable: {[t[1] for t in targets]}"
        )

    # Build every replacement before changing the model, so that a module that cannot be swapped
    # leaves it as it was. A module object used at several places is replaced by one new module
    # (its setting and seed those of its first place) installed at every one of them.
    built: dict[int, tuple[nn.Module, str]] = {}
    installs = []
    for position, kind, name, module, layer_spec in module_plan:
        if id(module) not in built:
            options = {"seed": seed + position, "redraw_interval": redraw_interval, "backend": backend,
                       "attention_dropout": attention_dropout}
            if kind == "mha":
                new = ScatterbrainMultiheadAttention.from_module(module, layer_spec, **options)
            else:
                new = ScatterbrainTimmAttention.from_timm(module, layer_spec, **options)
            built[id(module)] = (new, describe(layer_spec))
        elif built[id(module)][1] != describe(layer_spec):
            raise ValueError(f"{name} is the same module object as another swapped place, but per_layer gives "
                             "it a different setting")
        installs.append((kind, name, module, built[id(module)][0]))

    for prefix, name, hf_model, own in hf_plan:
        from . import hf

        before = f"{type(hf_model).__name__} attn_implementation={hf.current_implementation(hf_model)!r}"
        configured = hf.configure(
            hf_model, spec, own, seed=seed, redraw_interval=redraw_interval, backend=backend,
            attention_dropout=attention_dropout,
        )
        report.replaced.extend(SwapEntry(prefix + sub if sub else name, "hf", before, after) for sub, after in configured)

    for kind, name, module, new in installs:
        if _ORIGINAL not in new.__dict__:  # once per new module (a shared one is installed at several places)
            new.__dict__[_ORIGINAL] = module
            _share_hooks(module, new)
        _set_submodule(model, name, new)
        report.replaced.append(SwapEntry(name, kind, type(module).__name__, describe(new.spec)))
    return report


def restore_attention(model: nn.Module, *, kinds: tuple[str, ...] = KINDS) -> SwapReport:
    """Undo `swap_attention`: original modules back (with the current parameters), transformers
    models back to their previous attention implementation. Raises when there is nothing to undo."""
    hf = _hf_module()
    report = SwapReport()
    handled: list[str] = []
    actions = []
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_under(name, handled):
            continue
        if "hf" in kinds and hf is not None and hf.is_hf_model(module) and hf.is_configured(module):
            handled.append(name)
            actions.append(("hf", name, module))
        elif isinstance(module, (ScatterbrainMultiheadAttention, ScatterbrainTimmAttention)):
            kind = "mha" if isinstance(module, ScatterbrainMultiheadAttention) else "timm"
            handled.append(name)
            if kind not in kinds:
                continue
            if _ORIGINAL in module.__dict__:
                actions.append((kind, name, module))
            else:
                report.skipped.append((name, "built with Scatterbrain attention, not swapped: no original to restore"))
    if not actions:
        raise ValueError(
            f"restore_attention found nothing to restore in {type(model).__name__} (no module swapped by swap_attention)"
        )
    for kind, name, module in actions:
        if kind == "hf":
            after = hf.current_implementation(module)
            removed = hf.unconfigure(module)
            now = hf.current_implementation(module)
            prefix = name + "." if name else ""
            report.replaced.extend(
                SwapEntry(prefix + sub, "hf", f"attn_implementation={after!r}", f"attn_implementation={now!r}")
                for sub in removed
            )
            continue
        original = module.__dict__[_ORIGINAL]
        for pname in original._parameters:  # the current parameters (only those the swap shared)
            if pname in module._parameters:
                original._parameters[pname] = module._parameters[pname]
        for cname in original._modules:
            if cname in module._modules:
                original._modules[cname] = module._modules[cname]
        original.train(module.training)
        _set_submodule(model, name, original)
        report.replaced.append(SwapEntry(name, kind, type(module).__name__, type(original).__name__))
    for kind, _, module in actions:
        if kind != "hf" and _ORIGINAL in module.__dict__:  # (once per module: a shared one is at several places)
            _unshare_hooks(module, module.__dict__.pop(_ORIGINAL))
    return report


__all__ = ["KINDS", "SwapEntry", "SwapReport", "restore_attention", "swap_attention"]
