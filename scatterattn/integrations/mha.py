"""`ScatterbrainMultiheadAttention`: a drop-in `torch.nn.MultiheadAttention`.

Same constructor, parameters (``in_proj_weight``, ``in_proj_bias``, ``q/k/v_proj_weight``,
``bias_k``, ``bias_v``, ``out_proj``) and forward signature; it is a subclass, so code that checks
``isinstance(m, nn.MultiheadAttention)`` or reads its attributes keeps working. What differs:

* ``need_weights=True`` raises (Scatterbrain never forms the attention matrix); call it with
  ``need_weights=False``, as ``nn.TransformerEncoderLayer``/``DecoderLayer`` do. The second output
  is always None.
* ``attn_mask`` must be None or exactly the causal mask (bool: True above the diagonal; float: -inf
  above it, 0 elsewhere), else a clear error; ``is_causal=True`` alone also means causal.
* ``key_padding_mask``: bool (True = padded) or float with only 0 / -inf entries.
* attention dropout (``dropout > 0`` in training mode) raises unless the core is ``"exact"``.
* nested-tensor inputs (``nn.TransformerEncoder``'s inference fast path) are padded, attended and
  nested again.

The module registers a no-op forward pre-hook: ``nn.TransformerEncoderLayer``'s fused inference
path reads ``in_proj_weight`` and computes exact attention without calling ``self_attn`` unless a
hook is attached; the hook keeps that path from bypassing this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import LayerSpec, core_dropout, describe, make_core, model_device, resolve_spec


def _keep_module_call(module, args):
    """Forward pre-hook that does nothing; its presence disables torch's fused encoder-layer path."""
    return None


class ScatterbrainMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computed with Scatterbrain attention (see the module docstring).

    Extra keyword-only arguments: ``scatterbrain`` (a ScatterbrainConfig, a dict of its fields,
    ``"exact"`` or None for the defaults), ``seed``, ``redraw_interval``, ``backend`` (as for
    `scatterattn.ScatterbrainAttention`). The core is the child module ``scatterbrain``.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        scatterbrain: LayerSpec = None,
        seed: int | None = None,
        redraw_interval: int | None = None,
        backend: str = "auto",
        attention_dropout: str = "error",
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.spec = resolve_spec(scatterbrain)
        core_device = None if device is None or torch.device(device).type == "meta" else device
        self.scatterbrain = make_core(
            self.spec, self.head_dim, seed=seed, redraw_interval=redraw_interval, backend=backend, device=core_device,
            attention_dropout=attention_dropout,
        )
        self.register_forward_pre_hook(_keep_module_call)

    @classmethod
    def from_module(
        cls,
        mha: nn.MultiheadAttention,
        scatterbrain: LayerSpec = None,
        *,
        seed: int | None = None,
        redraw_interval: int | None = None,
        backend: str = "auto",
        attention_dropout: str = "error",
    ) -> "ScatterbrainMultiheadAttention":
        """A ScatterbrainMultiheadAttention sharing `mha`'s parameters (the same Parameter objects)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(mha).__name__}")
        hidden = [name for name in sorted(_MHA_PARAMETERS)
                  if mha._parameters.get(name) is None and getattr(mha, name, None) is not None]
        if hidden or torch.nn.utils.parametrize.is_parametrized(mha):
            raise TypeError(
                f"cannot share the parameters of a pruned or parametrized nn.MultiheadAttention "
                f"({', '.join(hidden) or 'parametrized'} computed, not a Parameter); remove the pruning "
                "(torch.nn.utils.prune.remove) or parametrization first")
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",
            scatterbrain=scatterbrain,
            seed=seed,
            redraw_interval=redraw_interval,
            backend=backend,
            attention_dropout=attention_dropout,
        )
        for name in list(new._parameters):
            new._parameters[name] = mha._parameters.get(name)
        new.out_proj = mha.out_proj
        device = model_device(mha)
        if device is not None:
            new.scatterbrain.to(device)
        new.train(mha.training)
        return new

    def describe(self) -> str:
        return describe(self.spec)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError(
                "ScatterbrainMultiheadAttention cannot return attention weights (Scatterbrain never forms the "
                "attention matrix): call it with need_weights=False"
            )
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, attn_mask, is_causal), None
        unbatched = query.dim() == 2
        if unbatched:
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError("unbatched query (L, E) needs unbatched key and value (S, E)")
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"query, key and value must be 3-D (or 2-D unbatched), got {query.dim()}, {key.dim()}, {value.dim()}"
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        causal = self._causal_from(attn_mask, is_causal, query.shape[1], key.shape[1])
        out = self._attend(query, key, value, self._padding_from(key_padding_mask), causal)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None

    # -- pieces ---------------------------------------------------------------------------------

    def _attend(self, query, key, value, padded, causal):
        """Batch-first (N, L, E) in, (N, L, E) out. padded: (N, S) bool or None."""
        batch, n_q, _ = query.shape
        if key.shape[0] != batch or value.shape[0] != batch:
            raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
        p = core_dropout(self.scatterbrain, self.dropout if self.training else 0.0, type(self).__name__)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        extra = (self.bias_k is not None) + bool(self.add_zero_attn)
        if extra and causal:
            raise ValueError(
                "add_bias_kv / add_zero_attn append keys after the sequence, which a causal mask would hide from "
                "early queries differently than nn.MultiheadAttention does; not supported with a causal mask"
            )
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[-1])], dim=1)
        if padded is not None:
            if padded.shape != (batch, key.shape[1]):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, source length) = {(batch, key.shape[1])}, "
                    f"got {tuple(padded.shape)}"
                )
            if extra:
                padded = F.pad(padded, (0, extra), value=False)
        heads, head_dim = self.num_heads, self.head_dim
        q = q.view(batch, n_q, heads, head_dim).transpose(1, 2)
        k = k.view(batch, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(batch, v.shape[1], heads, head_dim).transpose(1, 2)
        kwargs = {"dropout_p": p} if p else {}
        out = self.scatterbrain(q, k, v, is_causal=causal, key_padding_mask=padded, **kwargs)
        out = out.transpose(1, 2).reshape(batch, n_q, self.embed_dim)
        return self.out_proj(out)

    def _forward_nested(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("nested-tensor inputs take no key_padding_mask, attn_mask or is_causal")
        if not (query.is_nested and key.is_nested and value.is_nested):
            raise ValueError("query, key and value must all be nested tensors, or none of them")
        if not self.batch_first:
            raise ValueError("nested-tensor inputs need batch_first=True")
        lengths_q = [t.shape[0] for t in query.unbind()]
        lengths_k = [t.shape[0] for t in key.unbind()]
        q = query.to_padded_tensor(0.0)
        k = key.to_padded_tensor(0.0)
        v = value.to_padded_tensor(0.0)
        positions = torch.arange(k.shape[1], device=k.device)
        padded = positions[None, :] >= torch.tensor(lengths_k, device=k.device)[:, None]
        out = self._attend(q, k, v, padded, False)
        return torch.nested.nested_tensor([out[i, :n] for i, n in enumerate(lengths_q)])

    @staticmethod
    def _padding_from(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return mask
        if not mask.is_floating_point():
            raise TypeError(f"key_padding_mask must be bool or float, got {mask.dtype}")
        padded = torch.isneginf(mask)
        if not bool(((mask == 0) | padded).all()):
            raise ValueError(
                "a float key_padding_mask must hold only 0 (keep) and -inf (padded); arbitrary additive "
                "biases are not supported by Scatterbrain attention"
            )
        return padded

    @staticmethod
    def _causal_from(attn_mask, is_causal, n_q: int, n_k: int) -> bool:
        if attn_mask is None:
            return bool(is_causal)
        if attn_mask.dim() != 2:
            raise ValueError(
                f"attn_mask must be None or the 2-D causal mask (L, S); got shape {tuple(attn_mask.shape)}. "
                "Arbitrary attention masks are not supported by Scatterbrain attention (use key_padding_mask "
                "for padding)"
            )
        if tuple(attn_mask.shape) != (n_q, n_k):
            raise ValueError(f"the 2-D attn_mask has shape {tuple(attn_mask.shape)} but should be (L, S) = {(n_q, n_k)}")
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=attn_mask.device).triu(1)
        if attn_mask.dtype == torch.bool:
            exact_causal = torch.equal(attn_mask, hidden)
        elif attn_mask.is_floating_point():
            exact_causal = torch.equal(torch.isneginf(attn_mask), hidden) and bool((attn_mask[~hidden] == 0).all())
        else:
            raise TypeError(f"attn_mask must be bool or float, got {attn_mask.dtype}")
        if not exact_causal:
            raise ValueError(
                "attn_mask must be None or exactly the causal mask (True / -inf above the diagonal, False / 0 "
                "elsewhere); arbitrary attention masks are not supported by Scatterbrain attention"
            )
        return True

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


_MHA_PARAMETERS = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                   "bias_v"}


def is_plain_mha(module: nn.Module) -> bool:
    """torch.nn.MultiheadAttention as torch defines it: its own forward, no parameters, buffers or
    children beyond its standard ones (a subclass, or a pruned or parametrized module, would lose
    what it adds)."""
    return (isinstance(module, nn.MultiheadAttention) and not isinstance(module, ScatterbrainMultiheadAttention)
            and type(module).forward is nn.MultiheadAttention.forward
            and set(module._parameters) <= _MHA_PARAMETERS and not module._buffers
            and set(module._modules) == {"out_proj"})


__all__ = ["ScatterbrainMultiheadAttention", "is_plain_mha"]
