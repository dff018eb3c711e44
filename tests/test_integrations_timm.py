"""timm integration: ScatterbrainTimmAttention, the attn_layer hook, swap / restore on a ViT.

Two groups:
* tests on real timm models (tiny randomly initialised VisionTransformer, no downloads). timm is in
  the test extra; they skip only where timm or torchvision is missing (WHY_NO_TIMM says how to fix).
* timm-free tests of the same machinery on `TimmAttentionCopy`, a copy of timm 1.0.31's
  ``timm.layers.attention.Attention`` (non-fused path), so that the swap logic is covered anywhere.

Covering settings (bucket_size >= tokens) make Scatterbrain exact: outputs are compared with the dense
model at atol 1e-5 (float32).
"""

import inspect

import pytest
import torch
from torch import nn

from scatterattn import ScatterbrainConfig
from scatterattn.integrations import (
    AttachedScatterbrain,
    ExactAttention,
    ScatterbrainTimmAttention,
    ensure_torchvision_importable,
    restore_attention,
    scatterbrain_attn_layer,
    swap_attention,
)
from scatterattn.integrations.timm import restore_timm_attention, swap_timm_attention

ATOL = 1e-5
COVER = ScatterbrainConfig(num_features=16, bucket_size=64)  # 17 tokens per image here: exact
APPROX = ScatterbrainConfig(num_features=8, bucket_size=4)

WHY_NO_TIMM = (
    "timm (in the 'test' extra) imports torchvision when it is imported (timm/layers/create_norm.py), so "
    "these tests need both: pip install \"torch==2.13.0\" -e \".[test]\" (keep torch named in the same "
    "command, or pip replaces it to match the newest torchvision). With the CPU torch 2.13 that brings the "
    "CUDA torchvision 0.28, whose compiled operators do not load; ensure_torchvision_importable (called "
    "here and in conftest.py) makes its Python modules import."
)


def import_timm():
    ensure_torchvision_importable()  # no-op unless a torchvision with broken compiled ops is installed
    try:
        import timm
        from timm.models import vision_transformer  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name == "timm":
            pytest.skip(f"timm is not installed. {WHY_NO_TIMM}")
        if err.name == "torchvision":
            pytest.skip(f"timm is installed but torchvision is not. {WHY_NO_TIMM}")
        raise
    return timm


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def tiny_vit(timm, **kwargs):
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, qkv_bias=True)
    options.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**options).eval()


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# real timm


@torch.no_grad()
def test_swapped_vit_equals_dense_and_restores(timm):
    vit = tiny_vit(timm)
    x = images()
    dense = vit(x)
    originals = [block.attn for block in vit.blocks]
    report = swap_attention(vit, COVER)
    assert report.names == ["blocks.0.attn", "blocks.1.attn"]
    assert [(e.kind, e.before) for e in report] == [("timm", "Attention")] * 2
    swapped = vit.blocks[0].attn
    assert isinstance(swapped, ScatterbrainTimmAttention) and swapped.qkv is originals[0].qkv
    torch.testing.assert_close(vit(x), dense, atol=ATOL, rtol=0)
    restore_attention(vit)
    assert [block.attn for block in vit.blocks] == originals
    torch.testing.assert_close(vit(x), dense, atol=0, rtol=0)
    swap_timm_attention(vit, APPROX)
    approx = vit(x)
    assert (approx - dense).abs().max() > 1e-4 and torch.isfinite(approx).all()
    assert restore_timm_attention(vit).names == report.names


def test_vit_trains_with_default_configuration(timm):
    vit = tiny_vit(timm, img_size=64, patch_size=4)  # 257 tokens: more than one default bucket (128)
    swap_attention(vit)  # library defaults
    assert vit.blocks[0].attn.scatterbrain.config == ScatterbrainConfig()
    vit.train()
    loss = nn.functional.cross_entropy(vit(torch.randn(2, 3, 64, 64)), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    grad = vit.blocks[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@torch.no_grad()
def test_attn_layer_hook_and_pretrained_weights(timm):
    params = inspect.signature(timm.models.vision_transformer.VisionTransformer).parameters
    assert "attn_layer" in params  # the hook this integration uses
    dense = tiny_vit(timm)
    x = images()
    layer = scatterbrain_attn_layer(COVER, seed=7)
    built = tiny_vit(timm, attn_layer=layer)
    assert all(isinstance(b.attn, ScatterbrainTimmAttention) for b in built.blocks)
    assert [int(b.attn.scatterbrain.seed) for b in built.blocks] == [7, 8]
    result = built.load_state_dict(dense.state_dict(), strict=True)  # "pretrained" dense weights, unchanged
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(built(x), dense(x), atol=ATOL, rtol=0)
    created = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3,
        attn_layer=scatterbrain_attn_layer(APPROX),
    )
    assert isinstance(created.blocks[0].attn, ScatterbrainTimmAttention)
    assert created.blocks[0].attn.scatterbrain.config == APPROX


def test_constructor_and_parameter_names_match_timm(timm):
    reference = timm.models.vision_transformer.Attention
    ours = inspect.signature(ScatterbrainTimmAttention.__init__).parameters
    for name, param in inspect.signature(reference.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
    for options in ({}, {"qkv_bias": True}, {"qk_norm": True, "norm_layer": nn.LayerNorm},
                    {"scale_norm": True, "norm_layer": nn.LayerNorm}, {"gated": True}):
        torch.manual_seed(0)
        theirs = reference(32, num_heads=4, **options)
        mine = ScatterbrainTimmAttention(32, num_heads=4, scatterbrain=COVER, **options)
        assert {k for k in mine.state_dict() if not k.startswith("scatterbrain.")} == set(theirs.state_dict())
        mine.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 9, 32)
        with torch.no_grad():
            torch.testing.assert_close(mine(x), theirs(x), atol=ATOL, rtol=0)
            torch.testing.assert_close(mine(x, is_causal=True), theirs(x, is_causal=True), atol=ATOL, rtol=0)


@torch.no_grad()
def test_per_layer_exact_state_dict_round_trip(timm):
    x = images()
    vit = tiny_vit(timm)
    dense_tokens = vit.blocks[0](_tokens(vit, x))
    report = swap_attention(vit, APPROX, per_layer={0: "exact"})
    assert [e.after for e in report] == ["exact", "scatterbrain(features=8, lsh(bucket=4, hashes=1))"]
    assert isinstance(vit.blocks[0].attn.scatterbrain, ExactAttention)
    torch.testing.assert_close(vit.blocks[0](_tokens(vit, x)), dense_tokens, atol=ATOL, rtol=0)

    a, b = tiny_vit(timm), tiny_vit(timm)
    swap_attention(a, APPROX, seed=1)
    swap_attention(b, APPROX, seed=2)
    assert (a(x) - b(x)).abs().max() > 1e-4
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


def _tokens(vit, x):
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))


def test_unsupported_timm_attention_is_reported(timm):
    rope = timm.layers.AttentionRope(32, num_heads=4)
    with pytest.raises(ValueError, match="AttentionRope"):
        swap_attention(nn.Sequential(rope))
    attn = ScatterbrainTimmAttention(32, num_heads=4)
    with pytest.raises(ValueError, match="attn_mask=None only"):
        attn(torch.randn(1, 5, 32), attn_mask=torch.zeros(5, 5))


# --------------------------------------------------------------------------------------------
# timm-free: a copy of timm 1.0.31's Attention


class TimmAttentionCopy(nn.Module):
    """timm.layers.attention.Attention of timm 1.0.31 (non-fused path), for tests without timm."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0, norm_layer=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.gate = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None, is_causal=False):
        batch, n, channels = x.shape
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            attn = attn + attn.new_full((n, n), float("-inf")).triu_(1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


TimmAttentionCopy.__name__ = TimmAttentionCopy.__qualname__ = "Attention"
TimmAttentionCopy.__module__ = "timm.layers.attention"  # what swap_attention recognises


class TinyViT(nn.Module):
    def __init__(self, attn_layer=TimmAttentionCopy, depth=2, dim=32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": attn_layer(dim, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)})
            for _ in range(depth)
        )

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["attn"](block["norm"](x))
        return x


@torch.no_grad()
def test_timm_free_swap_equals_copy_and_restores():
    model = TinyViT().eval()
    x = torch.randn(2, 17, 12)
    dense = model(x)
    report = swap_attention(model, COVER)
    assert report.names == ["blocks.0.attn", "blocks.1.attn"] and {e.kind for e in report} == {"timm"}
    torch.testing.assert_close(model(x), dense, atol=ATOL, rtol=0)
    restore_attention(model)
    assert all(type(b["attn"]) is TimmAttentionCopy for b in model.blocks)
    torch.testing.assert_close(model(x), dense, atol=0, rtol=0)


def test_timm_free_attn_layer_and_training():
    layer = scatterbrain_attn_layer(APPROX, seed=3)
    model = TinyViT(attn_layer=layer)
    dense = TinyViT()
    model.load_state_dict(dense.state_dict(), strict=True)
    cores = [b["attn"].scatterbrain for b in model.blocks]
    assert all(isinstance(c, AttachedScatterbrain) and c.config == APPROX for c in cores)
    assert [int(c.seed) for c in cores] == [3, 4]
    x = torch.randn(2, 17, 12)
    out = model(x)
    assert (out - dense(x)).abs().max() > 1e-4
    out.pow(2).mean().backward()
    assert torch.isfinite(model.blocks[0]["attn"].qkv.weight.grad).all()
    dropped = ScatterbrainTimmAttention(32, num_heads=4, attn_drop=0.1, scatterbrain=APPROX).train()
    with pytest.raises(ValueError, match="attention dropout"):
        dropped(torch.randn(1, 5, 32))
    exact = ScatterbrainTimmAttention(32, num_heads=4, attn_drop=0.5, scatterbrain="exact").train()
    y = torch.randn(1, 5, 32)
    assert (exact(y) - exact(y)).abs().max() > 0  # exact layers apply attention dropout


class BiasedTimmAttentionCopy(TimmAttentionCopy):
    """A timm-style Attention with parameters of its own (as BEiT's q_bias / v_bias), which
    ScatterbrainTimmAttention would drop."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, **kwargs)
        self.q_bias = nn.Parameter(torch.zeros(dim))


BiasedTimmAttentionCopy.__name__ = BiasedTimmAttentionCopy.__qualname__ = "Attention"
BiasedTimmAttentionCopy.__module__ = "timm.models.beit"


def test_timm_attention_with_parameters_of_its_own_is_not_swapped():
    """Only timm Attention modules whose parameters all live in the children ScatterbrainTimmAttention
    takes over are swapped; others are reported and left unchanged (before: their own parameters
    were dropped, or the forward failed)."""
    model = nn.ModuleDict({"plain": TimmAttentionCopy(32, num_heads=4), "biased": BiasedTimmAttentionCopy(32, num_heads=4)})
    with pytest.warns(UserWarning, match="unchanged"):
        report = swap_attention(model, COVER)
    assert report.names == ["plain"] and type(model["biased"]) is BiasedTimmAttentionCopy
    with pytest.raises(TypeError, match="expected timm's vision-transformer Attention"):
        ScatterbrainTimmAttention.from_timm(BiasedTimmAttentionCopy(32, num_heads=4), COVER)


def test_attention_dropout_option_of_the_timm_layer():
    """attention_dropout='ignore' on the layer or on scatterbrain_attn_layer trains a ViT whose
    attn_drop > 0 (without that dropout); bad values raise."""
    x = torch.randn(1, 5, 32)
    layer = ScatterbrainTimmAttention(32, num_heads=4, attn_drop=0.1, scatterbrain=APPROX, seed=0,
                                      attention_dropout="ignore").train()
    assert torch.equal(layer(x), layer(x))
    built = scatterbrain_attn_layer(APPROX, seed=0, attention_dropout="ignore")(32, num_heads=4, attn_drop=0.1).train()
    assert torch.equal(built(x), built(x))
    with pytest.raises(ValueError, match="attention_dropout must be 'error' or 'ignore'"):
        scatterbrain_attn_layer(APPROX, attention_dropout="skip")


class WrappedLinear(nn.Module):
    """A Linear wrapped as LoRA or quantization wrap it (peft's lora.Linear is no nn.Linear)."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@torch.no_grad()
def test_timm_attention_with_a_wrapped_qkv_is_swapped():
    """LoRA applied before the swap wraps qkv: still timm's ViT attention, swapped, and equal to the
    wrapped original where Scatterbrain is exact."""
    model = TinyViT().eval()
    for block in model.blocks:
        block["attn"].qkv = WrappedLinear(block["attn"].qkv)
        nn.init.normal_(block["attn"].qkv.lora_B.weight)
    x = torch.randn(2, 17, 12)
    dense = model(x)
    assert swap_attention(model, COVER).names == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(model(x), dense, atol=ATOL, rtol=0)
