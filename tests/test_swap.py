"""swap_attention / restore_attention on torch.nn.MultiheadAttention (and the generic error paths).

With a covering setting (bucket_size >= source length) Scatterbrain attention is exact, so the swapped
module must reproduce nn.MultiheadAttention's output (atol 1e-5, float32)."""

import copy

import pytest
import torch
from torch import nn

from scatterattn import ScatterbrainConfig
from scatterattn.integrations import (
    AttachedScatterbrain,
    ExactAttention,
    ScatterbrainMultiheadAttention,
    restore_attention,
    swap_attention,
)

ATOL = 1e-5
COVER = ScatterbrainConfig(num_features=16, bucket_size=64)
APPROX = ScatterbrainConfig(num_features=8, bucket_size=4)
E, H, L, S, B = 32, 4, 10, 13, 3


def make_mha(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():  # non-zero biases so that they are exercised
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return mha.eval()


def inputs(batch_first, kdim=E, vdim=E, n_q=L, n_k=S):
    gen = torch.Generator().manual_seed(1)
    shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
    q = torch.randn(*shape(n_q, E), generator=gen)
    k = torch.randn(*shape(n_k, kdim), generator=gen)
    v = torch.randn(*shape(n_k, vdim), generator=gen)
    pad = torch.zeros(B, n_k, dtype=torch.bool)
    pad[1, n_k - 4:] = True
    pad[2, n_k - 7:] = True
    return q, k, v, pad


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "options",
    [{}, {"kdim": 24, "vdim": 20}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"bias": False}],
    ids=["plain", "kdim-vdim", "bias-kv", "zero-attn", "no-bias"],
)
@torch.no_grad()
def test_swapped_mha_equals_original_with_key_padding(batch_first, options):
    mha = make_mha(batch_first=batch_first, **options)
    q, k, v, pad = inputs(batch_first, options.get("kdim", E), options.get("vdim", E))
    ref, _ = mha(q, k, v, key_padding_mask=pad, need_weights=False)
    unpadded, _ = mha(q, k, v, need_weights=False)
    assert (ref - unpadded).abs().max() > 1e-3  # padding changes the answer
    new = ScatterbrainMultiheadAttention.from_module(mha, COVER)
    out, weights = new(q, k, v, key_padding_mask=pad, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    float_pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
    torch.testing.assert_close(new(q, k, v, key_padding_mask=float_pad, need_weights=False)[0], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
@torch.no_grad()
def test_causal_masks_and_unbatched_inputs(batch_first):
    mha = make_mha(batch_first=batch_first)
    q, _, _, pad = inputs(batch_first, n_k=L)
    pad = pad[:, :L]
    new = ScatterbrainMultiheadAttention.from_module(mha, COVER)
    bool_causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    float_causal = nn.Transformer.generate_square_subsequent_mask(L)
    ref, _ = mha(q, q, q, attn_mask=bool_causal, need_weights=False)
    for mask in (bool_causal, float_causal):
        torch.testing.assert_close(new(q, q, q, attn_mask=mask, need_weights=False)[0], ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(new(q, q, q, is_causal=True, need_weights=False)[0], ref, atol=ATOL, rtol=0)
    ref_pad, _ = mha(q, q, q, attn_mask=float_causal, key_padding_mask=pad.float().masked_fill(pad, float("-inf")), need_weights=False)
    out_pad, _ = new(q, q, q, attn_mask=float_causal, key_padding_mask=pad, need_weights=False)
    real = ~pad if batch_first else (~pad).t()
    torch.testing.assert_close(out_pad[real], ref_pad[real], atol=ATOL, rtol=0)
    x = q[0] if batch_first else q[:, 0]  # unbatched (L, E)
    torch.testing.assert_close(new(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0], atol=ATOL, rtol=0)


def test_unsupported_mha_options_raise_clearly():
    mha = make_mha(batch_first=True)
    new = ScatterbrainMultiheadAttention.from_module(mha, COVER)
    q, k, v, pad = inputs(True)
    with pytest.raises(ValueError, match="need_weights=False"):
        new(q, k, v)  # nn.MultiheadAttention's default need_weights=True
    with pytest.raises(ValueError, match="exactly the causal mask"):
        new(q, k, v, attn_mask=torch.rand(L, S) > 0.5, need_weights=False)
    with pytest.raises(ValueError, match="exactly the causal mask"):
        new(q, q, q, attn_mask=torch.zeros(L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -1e4), need_weights=False)
    with pytest.raises(ValueError, match="2-D causal mask"):
        new(q, q, q, attn_mask=torch.ones(B * H, L, L, dtype=torch.bool).triu(1), need_weights=False)
    with pytest.raises(ValueError, match="only 0"):
        new(q, k, v, key_padding_mask=torch.randn(B, S), need_weights=False)
    dropped = ScatterbrainMultiheadAttention.from_module(make_mha(batch_first=True, dropout=0.1), COVER).train()
    with pytest.raises(ValueError, match="attention dropout"):
        dropped(q, k, v, need_weights=False)


def encoder(layers=2, **kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True, **kwargs)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@torch.no_grad()
def test_transformer_encoder_fast_paths_do_not_bypass_the_swap():
    # In eval mode with padding, nn.TransformerEncoder converts to nested tensors and its layers take a
    # fused path that reads in_proj_weight directly; the swapped modules must still be the ones used.
    model = encoder()
    x, _, _, pad = inputs(True, n_k=L)
    pad = pad[:, :L]
    dense = model(x, src_key_padding_mask=pad)
    report = swap_attention(model, COVER)
    assert report.names == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [(e.kind, e.before) for e in report] == [("mha", "MultiheadAttention")] * 2
    real = ~pad
    torch.testing.assert_close(model(x, src_key_padding_mask=pad)[real], dense[real], atol=ATOL, rtol=0)
    restore_attention(model)
    swap_attention(model, APPROX)
    approx = model(x, src_key_padding_mask=pad)
    assert (approx[real] - dense[real]).abs().max() > 1e-4  # really computed by Scatterbrain
    assert torch.isfinite(approx[real]).all()


def test_swapped_encoder_trains_and_restore_keeps_the_training():
    model = encoder()
    x, _, _, pad = inputs(True, n_k=L)
    pad = pad[:, :L]
    original_modules = [layer.self_attn for layer in model.layers]
    with torch.no_grad():
        before = model(x, src_key_padding_mask=pad)
    swap_attention(model, APPROX, seed=4)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x, src_key_padding_mask=pad)[~pad].pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
    opt.step()
    trained_weight = model.layers[0].self_attn.in_proj_weight
    report = restore_attention(model)
    assert report.names == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [layer.self_attn for layer in model.layers] == original_modules
    assert all(type(m) is nn.MultiheadAttention for m in original_modules)
    assert model.layers[0].self_attn.in_proj_weight is trained_weight  # the trained parameters carry over
    assert model.training and model.layers[0].self_attn.training
    model.eval()
    with torch.no_grad():
        assert (model(x, src_key_padding_mask=pad) - before)[~pad].abs().max() > 1e-4


@torch.no_grad()
def test_restore_returns_original_behaviour_and_parameters_are_shared():
    model = nn.Sequential(make_mha(batch_first=True))

    class Call(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner[0](x, x, x, need_weights=False)[0]

    wrapped = Call(model)
    x = inputs(True)[0]
    dense = wrapped(x)
    original = model[0]
    swap_attention(wrapped, APPROX)
    swapped = model[0]
    assert isinstance(swapped, ScatterbrainMultiheadAttention) and isinstance(swapped, nn.MultiheadAttention)
    assert swapped.in_proj_weight is original.in_proj_weight and swapped.out_proj is original.out_proj
    assert (wrapped(x) - dense).abs().max() > 1e-4
    restore_attention(wrapped)
    assert model[0] is original
    torch.testing.assert_close(wrapped(x), dense, atol=0, rtol=0)


@torch.no_grad()
def test_state_dict_round_trip_and_per_layer_settings():
    a, b = encoder(), encoder()
    swap_attention(a, APPROX, seed=1)
    swap_attention(b, APPROX, seed=2)
    x = inputs(True, n_k=L)[0]
    out_a = a(x)
    assert (b(x) - out_a).abs().max() > 1e-4
    state = a.state_dict()
    assert "layers.0.self_attn.scatterbrain.feature_matrix" in state
    b.load_state_dict(state)
    torch.testing.assert_close(b(x), out_a, atol=0, rtol=0)
    # A dense checkpoint (no random features in it) loads strictly into a swapped model.
    b.load_state_dict(encoder().state_dict(), strict=True)

    c = encoder()
    dense_first = c.layers[0](x)
    report = swap_attention(c, APPROX, per_layer={0: "exact", "layers.1.self_attn": {"num_features": 4, "bucket_size": 2}})
    assert [e.after for e in report] == ["exact", "scatterbrain(features=4, lsh(bucket=2, hashes=1))"]
    assert isinstance(c.layers[0].self_attn.scatterbrain, ExactAttention)
    assert isinstance(c.layers[1].self_attn.scatterbrain, AttachedScatterbrain)
    torch.testing.assert_close(c.layers[0](x), dense_first, atol=ATOL, rtol=0)
    untouched = encoder()
    with pytest.raises(ValueError, match="match no swappable module"):
        swap_attention(untouched, APPROX, per_layer={5: "exact"})
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in untouched.layers)  # nothing changed


def test_models_without_supported_attention_raise():
    with pytest.raises(ValueError, match="no supported attention module"):
        swap_attention(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

    class MyAttention(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"does not support: 0 \(MyAttention\)"):
        swap_attention(nn.Sequential(MyAttention()))
    mixed = nn.ModuleDict({"mine": MyAttention(), "mha": make_mha()})
    with pytest.raises(ValueError, match="strict=True"):
        swap_attention(copy.deepcopy(mixed), strict=True)
    with pytest.warns(UserWarning, match="mine"):
        report = swap_attention(mixed)
    assert report.names == ["mha"] and report.skipped[0][0] == "mine"
    with pytest.raises(ValueError, match="already swapped: mha"):
        swap_attention(nn.ModuleDict({"mha": mixed["mha"]}))
    with pytest.raises(ValueError, match="nothing to restore"):
        restore_attention(encoder())
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        swap_attention(make_mha())
    with pytest.raises(TypeError, match="unknown Scatterbrain setting"):
        swap_attention(encoder(), bucket=3)
    with pytest.raises(ValueError, match="must be 'exact'"):
        swap_attention(encoder(), "dense")


class SharedLayers(nn.Module):
    """One MultiheadAttention object used at three places (weight-tied layers)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([make_mha(batch_first=True)] * 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x, x, x, need_weights=False)[0]
        return x


@torch.no_grad()
def test_a_module_used_at_several_places_is_swapped_at_each():
    """A shared module is replaced by one new module installed at every place (before: only the
    first place was swapped, silently), and restored at every place."""
    model = SharedLayers()
    original = model.layers[0]
    x = inputs(True)[0]
    dense = model(x)
    report = swap_attention(model, COVER)
    assert report.names == ["layers.0", "layers.1", "layers.2"]
    assert all(layer is model.layers[0] for layer in model.layers)
    assert isinstance(model.layers[0], ScatterbrainMultiheadAttention)
    torch.testing.assert_close(model(x), dense, atol=ATOL, rtol=0)
    restore_attention(model)
    assert all(layer is original for layer in model.layers)
    with pytest.raises(ValueError, match="same module object as another swapped place"):
        swap_attention(model, COVER, per_layer={"layers.1": APPROX})


def test_modules_that_add_to_multihead_attention_are_not_swapped():
    """A pruned MultiheadAttention (its weight computed from weight_orig and a mask) or a subclass
    with a parameter of its own would lose what it adds: such modules are left unchanged and
    reported (an error with strict=True), and from_module refuses a pruned one; a swap that fails
    changes nothing."""
    import torch.nn.utils.prune as prune

    class WithGain(nn.MultiheadAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gain = nn.Parameter(torch.ones(1))

    pruned = make_mha()
    prune.random_unstructured(pruned, "in_proj_weight", amount=0.3)
    model = nn.ModuleList([make_mha(), pruned, WithGain(E, H)])
    with pytest.warns(UserWarning, match="unchanged"):
        report = swap_attention(model, COVER)
    assert report.names == ["0"] and type(model[1]) is nn.MultiheadAttention and type(model[2]) is WithGain
    assert {name for name, _ in report.skipped} == {"1", "2"}
    with pytest.raises(TypeError, match="pruned or parametrized"):
        ScatterbrainMultiheadAttention.from_module(pruned, COVER)
    restore_attention(model)
    with pytest.raises(ValueError, match="strict=True"):
        swap_attention(model, COVER, strict=True)
    assert type(model[0]) is nn.MultiheadAttention  # the failed swap changed nothing


def test_per_layer_dicts_apply_on_top_of_the_default_setting():
    model = encoder(layers=2)
    report = swap_attention(model, COVER, per_layer={"layers.1.self_attn": {"num_features": 4}})
    assert model.layers[1].self_attn.spec == ScatterbrainConfig(num_features=4, bucket_size=64)
    assert model.layers[0].self_attn.spec == COVER and len(report) == 2


@pytest.mark.parametrize("layout", ["batch-first", "sequence-first", "unbatched"])
def test_causal_mask_of_the_wrong_size_and_dropout_option(layout):
    """A 2-D attn_mask must be (L, S), as torch requires, in every input layout (a causal mask of
    the right size with L != S still works); attention_dropout='ignore' on the constructor trains
    a layer whose MultiheadAttention has dropout."""
    mha = ScatterbrainMultiheadAttention(E, H, batch_first=layout == "batch-first", scatterbrain=APPROX, seed=0)
    shape = {"batch-first": lambda n: (2, n, E), "sequence-first": lambda n: (n, 2, E), "unbatched": lambda n: (n, E)}
    q, kv = torch.randn(shape[layout](6)), torch.randn(shape[layout](9))
    with pytest.raises(ValueError, match=r"attn_mask has shape \(4, 4\) but should be \(L, S\) = \(6, 9\)"):
        mha(q, kv, kv, attn_mask=nn.Transformer.generate_square_subsequent_mask(4), need_weights=False)
    causal = torch.ones(6, 9, dtype=torch.bool).triu(1)
    assert mha(q, kv, kv, attn_mask=causal, need_weights=False)[0].shape == q.shape
    if layout != "batch-first":
        return
    q = torch.randn(2, 6, E)
    dropped = ScatterbrainMultiheadAttention(E, H, dropout=0.1, batch_first=True, scatterbrain=APPROX, seed=0).train()
    with pytest.raises(ValueError, match="attention_dropout='ignore'"):
        dropped(q, q, q, need_weights=False)
    ignoring = ScatterbrainMultiheadAttention(E, H, dropout=0.1, batch_first=True, scatterbrain=APPROX, seed=0,
                                              attention_dropout="ignore").train()
    out = ignoring(q, q, q, need_weights=False)[0]
    assert torch.equal(out, ignoring(q, q, q, need_weights=False)[0])  # no dropout applied


def test_hooks_carry_over_to_the_replacement_and_back():
    """Hooks registered on a module before the swap act on its replacement (before: silently dropped),
    their handles still remove them, hooks registered during the swap stay after restore, and the
    replacement's own pre-hook (which keeps torch's fused encoder path off) does not."""
    from scatterattn.integrations import mha as mha_module

    model = nn.ModuleList([make_mha(batch_first=True)])
    original = model[0]
    q, k, v, pad = inputs(True)
    seen = []
    out_hook = original.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    original.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, "key_padding_mask": pad}),
                                       with_kwargs=True)
    grads = []
    original.register_full_backward_hook(lambda mod, grad_in, grad_out: grads.append(grad_out[0].shape))
    with torch.no_grad():
        padded_dense = original(q, k, v, need_weights=False)[0]
    swap_attention(model, COVER)
    swapped = model[0]
    q.requires_grad_(True)
    out = swapped(q, k, v, need_weights=False)[0]  # the pre-hook adds the padding mask
    torch.testing.assert_close(out, padded_dense, atol=ATOL, rtol=0)
    out.sum().backward()
    assert seen == ["MultiheadAttention", "ScatterbrainMultiheadAttention"]
    assert grads == [out.shape]
    out_hook.remove()  # a handle from before the swap removes the hook from the replacement
    late = swapped.register_forward_hook(lambda mod, args, out: seen.append("late"))
    with torch.no_grad():
        swapped(q, k, v, need_weights=False)
    assert seen[2:] == ["late"]
    restore_attention(model)
    assert model[0] is original
    assert mha_module._keep_module_call not in original._forward_pre_hooks.values()
    assert len(original._forward_pre_hooks) == 1 and len(original._forward_hooks) == 1
    with torch.no_grad():
        original(q, k, v, need_weights=False)
    assert seen[3:] == ["late"]
    late.remove()
    swap_attention(model, COVER)  # swapped again: the fused-path guard is back on the replacement
    assert mha_module._keep_module_call in model[0]._forward_pre_hooks.values()


def test_modules_with_a_forward_replaced_on_the_instance_are_not_swapped():
    """A forward wrapped on the instance (as accelerate's hooks do) belongs to the original object and
    cannot move to a replacement: such a module is left unchanged and reported."""
    model = nn.ModuleList([make_mha(), make_mha()])
    wrapped = model[1]
    inner = wrapped.forward
    wrapped.forward = lambda *args, **kwargs: inner(*args, **kwargs)
    with pytest.warns(UserWarning, match="unchanged"):
        report = swap_attention(model, COVER)
    assert report.names == ["0"] and model[1] is wrapped
    assert [name for name, _ in report.skipped] == ["1"]
    assert "forward replaced on the instance" in report.skipped[0][1]


def test_hooks_registered_during_the_swap_and_a_failed_swap():
    """A full backward hook registered on the replacement fires on the original after restore (its
    flag goes back with it); swapping a bare MultiheadAttention (the model itself) raises and leaves
    no hook of the replacement behind (it would keep torch's fused encoder path off for good)."""
    from scatterattn.integrations import mha as mha_module

    model = nn.ModuleList([make_mha(batch_first=True)])
    original = model[0]
    swap_attention(model, COVER)
    fired = []
    model[0].register_full_backward_hook(lambda mod, grad_in, grad_out: fired.append(type(mod).__name__))
    restore_attention(model)
    q, k, v, _ = inputs(True)
    original(q.requires_grad_(), k, v, need_weights=False)[0].sum().backward()
    assert fired == ["MultiheadAttention"]

    bare = make_mha()
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        swap_attention(bare, COVER)
    assert mha_module._keep_module_call not in bare._forward_pre_hooks.values()
