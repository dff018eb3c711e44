"""GPU-only kernel checks: bf16 on compiled kernels and larger shapes (the interpreter runs bf16
only on small shapes, with tests/conftest.py's fix for its bf16 dot), long sequences, large norms
and memory. Run on the device machine by bench/gpu_check.sh.

Tolerances (relative Frobenius error against the float64 reference on the same rounded inputs and
feature matrix): bf16 4e-2 for outputs and gradients (dots in bf16 with fp32 accumulation)."""

import pytest
import torch

import scatterattn as sa
from scatterattn.features import draw_feature_matrix, draw_hash_projections

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (kernels compiled for sm_80+)"),
]

from test_kernels import SETTINGS, rel, run_both  # noqa: E402  (same helpers as the interpreter tests)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_bf16_matches_reference(name):
    got, want = run_both(torch.bfloat16, 2, 4, 2, 300, 257, 64, SETTINGS[name], padded=True)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), label
        assert rel(a, b) < 4e-2, (label, rel(a, b))


@pytest.mark.parametrize("dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dims_half(dim, dtype):
    got, want = run_both(dtype, 1, 4, 4, 1000, 1000, dim, dict(sparse="lsh", bucket_size=128, num_features=64))
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel(a, b) < 4e-2, (label, dim, rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparse", ["lsh", "local"])
def test_64k_tokens_large_norms_finite(dtype, sparse):
    """No inf or NaN at 65,536 tokens with query/key norms of 25, forward and backward."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 4, 65536, 64)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
    q, k = (x / x.norm(dim=-1, keepdim=True) * 25 for x in (q, k))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    w = draw_feature_matrix(256, 64, generator=torch.Generator().manual_seed(1)).to(dtype).float()
    proj = draw_hash_projections(1, 64, generator=torch.Generator().manual_seed(2))
    kw = dict(sparse=sparse, feature_matrix=w, hash_projections=proj)
    out = sa.scatterbrain_attention(q, k, v, backend="triton", **kw)
    out.float().square().mean().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    # against the reference on the same inputs (fp32 compute), on the first 2 heads
    ref = sa.scatterbrain_attention(
        q.detach()[:, :2].float(), k.detach()[:, :2].float(), v.detach()[:, :2].float(),
        backend="reference", **kw
    )
    assert rel(out.detach()[:, :2].float(), ref) < 5e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_64k_tokens_diffuse_attention_with_large_value_sums(dtype):
    """Small norms (every feature weight near 1) and values of mean 2: the low-rank state
    KV_f = sum_j phi~_jf v_j reaches ~130,000, past fp16's range if it were rounded to fp16 (the
    kernels keep it fp32 for fp16 inputs, bf16 only for bf16). The output stays near 2."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 2, 65536, 64)
    q, k = (0.05 * torch.randn(shape, device="cuda", generator=gen) for _ in range(2))
    v = 2 + 0.1 * torch.randn(shape, device="cuda", generator=gen)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out = sa.scatterbrain_attention(q, k, v, backend="triton", seed=0)
    out.float().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert (out.float() - 2).abs().max() < 0.1


def test_lsh_hash_kernels_64k_tokens_gqa_padding():
    """The hashing kernels at 65,536 tokens (GQA, key padding, 2 rounds, norms up to 30; offsets past
    int32 for the largest buffers would show here) against torch on fp32 copies: 1e-5 relative,
    the same +inf keys."""
    from scatterattn import sparsity
    from scatterattn.kernels.lsh_hash import xbox_hashes

    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, 8, 65536, 64, device="cuda", generator=gen)
    k = torch.randn(1, 2, 65536, 64, device="cuda", generator=gen)
    q, k = (x * torch.rand(x.shape[:-1] + (1,), device="cuda", generator=gen) * 30 for x in (q, k))
    q, k = q.bfloat16(), k.bfloat16()
    valid = torch.ones(1, 65536, dtype=torch.bool, device="cuda")
    valid[0, -1000:] = False
    directions = draw_hash_projections(2, 64, generator=torch.Generator().manual_seed(4)).cuda()
    q_hash, k_hash, joint = xbox_hashes(q, k, directions, valid)
    want_q, want_k, _ = sparsity.xbox_hashes(q.cpu(), k.cpu(), directions.cpu(), valid.cpu())
    assert joint is not None and joint.shape == (1, 10, 2, 65536)
    assert rel(q_hash.cpu(), want_q) < 1e-5
    assert torch.equal(torch.isinf(k_hash).cpu(), torch.isinf(want_k))
    assert rel(k_hash.nan_to_num(posinf=0.0).cpu(), want_k.nan_to_num(posinf=0.0)) < 1e-5


def test_memory_is_linear():
    """Forward + backward peak at 64k tokens stays far below one N x N score matrix per head."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    shape = (1, 16, 65536, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    base = torch.cuda.memory_allocated()
    out = sa.scatterbrain_attention(q, k, v, seed=0, backend="triton")
    out.sum().backward()
    extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert extra_mib < 2048, extra_mib  # one bf16 64k x 64k matrix alone is 8192 MiB


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_chained_gradient_kernels_half(dtype, dim, is_causal):
    """The chained-gradient Kronecker kernels with bf16 tensor-core operands against the fp32 einsum
    chain on the same 16-bit inputs and features: bf16 operand rounding is ~0.4% (tolerance 2e-2),
    a hundred times below the chain's own approximation error."""
    from scatterattn import lora

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 1000, dim, device="cuda", generator=gen) * 0.5
    k = torch.randn(1, 2, 1000, dim, device="cuda", generator=gen) * 0.5
    v = torch.randn(1, 2, 1000, dim, device="cuda", generator=gen)
    do = torch.randn(1, 8, 1000, dim, device="cuda", generator=gen)
    q, k, v, do = (x.to(dtype) for x in (q, k, v, do))
    results = {}
    for backend in ("reference", "triton"):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = lora.chained_lowrank_attention(qs, ks, vs, is_causal=is_causal, threshold=None, seed=0, backend=backend)
        results[backend] = torch.autograd.grad(out, (qs, ks, vs), do)
    for label, a, b in zip(("dq", "dk", "dv"), results["triton"], results["reference"]):
        assert a.dtype == dtype and torch.isfinite(a).all(), label
        assert rel(a.float(), b.float()) < 2e-2, (label, rel(a.float(), b.float()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [2.0, None], ids=["default-threshold", "always-chain"])
def test_chained_gradient_64k_tokens_finite(dtype, threshold):
    """The chained backward at 65,536 tokens with query/key norms of 25: groups go exact by the
    threshold (counted), or, forced through the chain, exact where the factors underflow (counted):
    never inf or NaN, and every group is accounted for."""
    from scatterattn import lora

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 4, 65536, 64)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
    q, k = (x / x.norm(dim=-1, keepdim=True) * 25 for x in (q, k))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    stats = lora.ChainedGradientStats()
    out = lora.chained_lowrank_attention(q, k, v, threshold=threshold, stats=stats, seed=0, backend="triton")
    out.float().square().mean().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert stats.approximate + stats.fallback == 4, stats
    if threshold is not None:
        assert stats.fallback == 4, stats  # logit bound 25 * 25 / 8 is far above 2


def test_chained_exact_factors_keep_fp32_operands():
    """factors='exact' is the algebra check: with bf16 inputs its kernels must not round operands
    to bf16, so triton and the einsum chain agree up to the final cast of the gradients."""
    from scatterattn import lora

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 300, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4))
    results = {}
    for backend in ("reference", "triton"):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = lora.chained_lowrank_attention(qs, ks, vs, factors="exact", threshold=None, backend=backend)
        results[backend] = torch.autograd.grad(out, (qs, ks, vs), do)
    for a, b in zip(results["triton"], results["reference"]):
        assert rel(a.float(), b.float()) < 5e-4  # bf16 operands would give 3e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (inputs on one, the other current)")
def test_inputs_on_another_gpu_than_the_current_one():
    """Triton launches on the current device; the launchers switch to the inputs' GPU, so a model
    spread over GPUs (device_map="auto") gets the same results on its second GPU as on its first."""
    from scatterattn import lora

    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(1, 4, 700, 64, generator=gen).to(torch.bfloat16) for _ in range(4)]
    results = {}
    torch.cuda.set_device(0)
    for device in ("cuda:0", "cuda:1"):
        q, k, v, do = (x.to(device) for x in cpu)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = sa.scatterbrain_attention(q, k, v, num_features=64, bucket_size=128, seed=0, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
        chained = lora.chained_lowrank_attention(q, k, v, threshold=None, seed=0, backend="triton")
        chained_grads = torch.autograd.grad(chained, (q, k, v), do)
        results[device] = [t.cpu() for t in (out, *grads, *chained_grads)]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):  # equal on identical GPUs; 1e-3 allows others
        assert torch.isfinite(b).all() and rel(b.float(), a.float()) < 1e-3
