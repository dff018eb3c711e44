"""Under torch.autocast every attention entry point attends in the autocast dtype, as torch's
scaled_dot_product_attention does: float16/bfloat16/float32 inputs (mixed ones too, as a model with
rotary embeddings hands over fp32 q, k and a bf16 v) are cast to it, and the call runs with autocast
off, so its float32 internals (feature logits, hashes, normalisers) stay float32. The result must
equal the same call on inputs cast by hand, exactly. Before: the reference crashed (a dtype mismatch
inside scatter_reduce), and mixed inputs were refused.

CPU autocast (bfloat16 for the reference, float16 for the Triton kernels in the interpreter); CUDA
autocast takes the same code path (the entry points key on the inputs' device type)."""

import pytest
import torch

import scatterattn as sa
from scatterattn import ChainedLowRankAttention, ScatterbrainAttention, lora

DTYPE = torch.bfloat16


def inputs(n=96, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, n, dim, generator=gen) for _ in range(3))
    return q, k[:, :2], v[:, :2]  # grouped-query heads


CALLS = {
    "scatterbrain-lsh": lambda q, k, v, **kw: sa.scatterbrain_attention(q, k, v, num_features=32, bucket_size=32,
                                                                        seed=0, **kw),
    "scatterbrain-local": lambda q, k, v, **kw: sa.scatterbrain_attention(q, k, v, num_features=32, sparse="local",
                                                                          window=24, seed=0, **kw),
    "performer": lambda q, k, v, **kw: sa.performer_attention(q, k, v, num_features=32, seed=0, **kw),
    "dense": lambda q, k, v, **kw: sa.dense_attention(q, k, v, **kw),
    "chained": lambda q, k, v, **kw: lora.chained_lowrank_attention(q, k, v, num_features=32, threshold=None, seed=0,
                                                                    stats=None, **kw),
}


def forward_backward(call, q, k, v, *, autocast, backward_inside=False, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    context = torch.autocast("cpu", dtype=DTYPE) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        out = call(q, k, v, **kw)
        loss = out.float().square().sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(CALLS))
def test_autocast_attends_in_its_dtype(name, is_causal):
    q, k, v = inputs()
    got = forward_backward(CALLS[name], q, k, v, autocast=True, is_causal=is_causal)
    want = forward_backward(CALLS[name], *(x.to(DTYPE) for x in (q, k, v)), autocast=False, is_causal=is_causal)
    assert got[0].dtype == DTYPE
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), label


def test_mixed_input_dtypes_under_autocast():
    """fp32 q and k with a bf16 v (rotary embeddings in fp32 after autocast projections) attend as SDPA
    does under autocast; outside autocast mixed dtypes stay an error."""
    q, k, v = inputs()
    with torch.autocast("cpu", dtype=DTYPE):
        out = sa.scatterbrain_attention(q, k, v.to(DTYPE), num_features=32, bucket_size=32, seed=0)
    want = sa.scatterbrain_attention(q.to(DTYPE), k.to(DTYPE), v.to(DTYPE), num_features=32, bucket_size=32, seed=0)
    assert torch.equal(out, want)
    with pytest.raises(TypeError, match="value dtype"):
        sa.scatterbrain_attention(q, k, v.to(DTYPE), num_features=32, bucket_size=32, seed=0)


@pytest.mark.parametrize("by", ["keyword", "mixed"])
@pytest.mark.parametrize("name", ["scatterbrain", "dense", "module"])
def test_inputs_passed_by_name_follow_autocast(name, by):
    """q, k, v passed as keywords (all, or k and v) are cast too; before, query=... skipped the cast
    (a crash, or fp32 output computed in bf16 inside) and key=... gave a false dtype mismatch."""
    call = {"scatterbrain": lambda *a, **kw: sa.scatterbrain_attention(*a, **kw, num_features=32, bucket_size=32, seed=0),
            "dense": sa.dense_attention,
            "module": ScatterbrainAttention(16, num_features=32, bucket_size=32, seed=0)}[name]
    q, k, v = inputs()
    with torch.autocast("cpu", dtype=DTYPE):
        got = call(query=q, key=k, value=v) if by == "keyword" else call(q, key=k, value=v)
    want = call(q.to(DTYPE), k.to(DTYPE), v.to(DTYPE))
    assert got.dtype == DTYPE and torch.equal(got, want)


def test_float64_inputs_stay_float64_under_autocast():
    q, k, v = (x.double() for x in inputs())
    with torch.autocast("cpu", dtype=DTYPE):
        out = sa.scatterbrain_attention(q, k, v, num_features=32, bucket_size=32, seed=0)
    assert out.dtype == torch.float64
    assert torch.equal(out, sa.scatterbrain_attention(q, k, v, num_features=32, bucket_size=32, seed=0))


@pytest.mark.parametrize("module", [ScatterbrainAttention, ChainedLowRankAttention])
def test_modules_follow_autocast(module):
    attn = module(16, num_features=32, seed=0)
    q, k, v = inputs()
    got = forward_backward(attn, q, k, v, autocast=True)
    want = forward_backward(attn, *(x.to(DTYPE) for x in (q, k, v)), autocast=False)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), label


def test_chained_backward_inside_autocast_stays_float32_inside():
    """A backward called inside the autocast region (not torch's recipe, but common) must not round
    the chain's float32 products to bf16: the chained backward turns autocast off for itself."""
    q, k, v = inputs()
    got = forward_backward(CALLS["chained"], q, k, v, autocast=True, backward_inside=True)
    want = forward_backward(CALLS["chained"], *(x.to(DTYPE) for x in (q, k, v)), autocast=False)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), label


def test_triton_kernels_under_autocast():
    """The kernels get the autocast dtype too and match the same call on hand-cast inputs: on a GPU
    under CUDA autocast in bf16, here in the interpreter under CPU autocast in float16 (the
    interpreter's bf16 dot is wrong)."""
    from scatterattn.triton_backend import unsupported_reason

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    q, k, v = (x.to(device) for x in inputs(n=70))
    reason = unsupported_reason(q.to(dtype), is_causal=False)
    if reason is not None:
        pytest.skip(f"kernels unavailable here: {reason}")
    call = CALLS["scatterbrain-lsh"]
    with torch.autocast(device, dtype=dtype):
        got = call(q, k, v, backend="triton")
    want = call(q.to(dtype), k.to(dtype), v.to(dtype), backend="triton")
    assert got.dtype == dtype and torch.equal(got, want)


def test_compiled_module_under_autocast():
    """torch.compile(fullgraph=True) traces the autocast handling (no graph break) and matches eager
    to a bf16 rounding (Inductor drops fp32 -> bf16 -> fp32 round trips unless told to emulate them)."""
    import torch._inductor.config as inductor_config

    attn = ScatterbrainAttention(16, num_features=16, bucket_size=16, seed=0)
    compiled = torch.compile(attn, fullgraph=True)
    q, k, v = inputs(n=64)
    with torch.autocast("cpu", dtype=DTYPE), inductor_config.patch(emulate_precision_casts=True):
        got, want = compiled(q, k, v), attn(q, k, v)
    assert got.dtype == DTYPE
    # up to 2 bf16 ulps at |out| < 2 (without emulate_precision_casts the compiled call is 0.11 off)
    torch.testing.assert_close(got, want, atol=1.6e-2, rtol=0)
