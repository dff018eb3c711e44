"""The PyTorch reference against the math: special cases, implied matrix, unbiasedness, gradients,
stability. Tolerances: float64 1e-10 for identities; statistical tests state their own bounds."""

import functools
import math

import pytest
import torch

import scatterattn as sa
from scatterattn.triton_backend import unsupported_reason
from scatterattn.features import draw_feature_matrix, positive_features

F64 = torch.float64


def make_qkv(batch=2, heads=4, kv_heads=2, n_q=37, n_k=29, dim=8, v_dim=None, dtype=F64, norm=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=gen, dtype=F64)
    k = torch.randn(batch, kv_heads, n_k, dim, generator=gen, dtype=F64)
    v = torch.randn(batch, kv_heads, n_k, v_dim or dim, generator=gen, dtype=F64)
    if norm is not None:
        q = q / q.norm(dim=-1, keepdim=True) * norm
        k = k / k.norm(dim=-1, keepdim=True) * norm
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(batch, n_k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n_k, generator=gen) < 0.3
    mask[0, -5:] = True  # a padded tail, as in a padded batch
    mask[-1] = False  # one element with no padding
    return mask


MASKS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="causal"),
    pytest.param(False, True, id="padding"),
    pytest.param(True, True, id="causal+padding"),
]


def expand_kv(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def masked_softmax_attention(q, k, v, allowed, scale):
    """Dense softmax restricted to `allowed` (B, H, N, S); rows with nothing allowed give 0."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def allowed_pairs(batch, heads, n_q, n_k, is_causal, kpm):
    allowed = torch.ones(batch, heads, n_q, n_k, dtype=torch.bool)
    if is_causal:
        allowed &= torch.ones(n_q, n_k, dtype=torch.bool).tril()
    if kpm is not None:
        allowed &= ~kpm[:, None, None, :]
    return allowed


# ---------------------------------------------------------------- special cases of the math


@pytest.mark.parametrize("is_causal,padded", MASKS)
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("feature_type", ["positive", "hyperbolic"])
def test_one_bucket_covering_all_keys_is_exact(is_causal, padded, n_hashes, feature_type):
    q, k, v = make_qkv(norm=3.0)
    kpm = padding_mask(2, 29) if padded else None
    exact = sa.dense_attention(q, k, v, is_causal=is_causal, key_padding_mask=kpm)
    out = sa.scatterbrain_attention(
        q, k, v, num_features=16, feature_type=feature_type, bucket_size=29, n_hashes=n_hashes,
        is_causal=is_causal, key_padding_mask=kpm, seed=0,
    )
    assert (out - exact).abs().max() < 1e-10
    # and dense matches softmax with the same mask computed independently
    allowed = allowed_pairs(2, 4, 37, 29, is_causal, kpm)
    assert (exact - masked_softmax_attention(q, k, v, allowed, 8**-0.5)).abs().max() < 1e-12


@pytest.mark.parametrize("is_causal,padded", MASKS)
def test_window_covering_all_keys_is_exact(is_causal, padded):
    q, k, v = make_qkv(norm=3.0)
    kpm = padding_mask(2, 29) if padded else None
    exact = sa.dense_attention(q, k, v, is_causal=is_causal, key_padding_mask=kpm)
    out = sa.scatterbrain_attention(
        q, k, v, num_features=16, sparse="local", window=2 * 37, is_causal=is_causal, key_padding_mask=kpm, seed=0
    )
    assert (out - exact).abs().max() < 1e-10


@pytest.mark.parametrize("is_causal,padded", MASKS)
@pytest.mark.parametrize("sparse", ["lsh", "local"])
def test_no_features_is_sparse_softmax_over_the_support(is_causal, padded, sparse):
    q, k, v = make_qkv(n_q=40, n_k=40)
    kpm = padding_mask(2, 40) if padded else None
    settings = dict(sparse=sparse, bucket_size=8, n_hashes=2, window=6, is_causal=is_causal, key_padding_mask=kpm, seed=5)
    support = sa.attention_support(q, k, num_features=0, **settings)
    assert 0 < support.float().mean() < 0.6  # a real sparse pattern, not everything
    expected = masked_softmax_attention(q, k, v, support, 8**-0.5)
    assert (sa.scatterbrain_attention(q, k, v, num_features=0, **settings) - expected).abs().max() < 1e-12
    only = sa.lsh_attention if sparse == "lsh" else sa.local_attention
    kwargs = dict(bucket_size=8, n_hashes=2) if sparse == "lsh" else dict(window=6)
    alone = only(q, k, v, is_causal=is_causal, key_padding_mask=kpm, seed=5, **kwargs)
    assert (alone - expected).abs().max() < 1e-12


def performer_by_hand(q, k, v, w, scale, is_causal, kpm):
    """Unstabilised Performer in float64: phi(Q) phi(K)^T as a dense matrix (small inputs)."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    phi_q = positive_features(q * math.sqrt(scale), w)
    phi_k = positive_features(k * math.sqrt(scale), w)
    a = phi_q @ phi_k.transpose(-1, -2)
    a = a * allowed_pairs(q.shape[0], q.shape[1], q.shape[2], k.shape[2], is_causal, kpm)
    return (a @ v) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("is_causal,padded", MASKS)
def test_empty_support_is_performer(is_causal, padded):
    # n_q = 150 > 2 causal chunks so the chunked prefix sums are exercised
    q, k, v = make_qkv(n_q=150, n_k=150, norm=2.0)
    kpm = padding_mask(2, 150) if padded else None
    w = draw_feature_matrix(32, 8, generator=torch.Generator().manual_seed(3))
    expected = performer_by_hand(q, k, v, w.double(), 8**-0.5, is_causal, kpm)
    for out in (
        sa.scatterbrain_attention(q, k, v, sparse="none", num_features=32, feature_matrix=w, is_causal=is_causal, key_padding_mask=kpm),
        sa.performer_attention(q, k, v, num_features=32, feature_matrix=w, is_causal=is_causal, key_padding_mask=kpm),
    ):
        assert (out - expected).abs().max() < 1e-10


def test_hyperbolic_is_positive_with_mirrored_rows():
    q, k, v = make_qkv()
    w = draw_feature_matrix(16, 8, generator=torch.Generator().manual_seed(0))
    hyper = sa.performer_attention(q, k, v, num_features=16, feature_type="hyperbolic", feature_matrix=w)
    mirrored = sa.performer_attention(q, k, v, num_features=32, feature_matrix=torch.cat([w, -w]))
    assert (hyper - mirrored).abs().max() < 1e-12


# ---------------------------------------------------------------- the implied matrix


SETTINGS = [
    pytest.param(dict(sparse="lsh", bucket_size=8, n_hashes=3), id="lsh-3-rounds"),
    pytest.param(dict(sparse="lsh", bucket_size=5, n_hashes=1, feature_type="hyperbolic"), id="lsh-hyperbolic"),
    pytest.param(dict(sparse="local", window=6), id="local"),
    pytest.param(dict(sparse="none"), id="performer"),
]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("is_causal,padded", MASKS)
def test_output_is_implied_matrix_times_values(settings, is_causal, padded):
    """The O(N) reference equals the dense construction A^ V (independent stabilisation), and A^
    is a row-stochastic, non-negative matrix that is exact on the support."""
    q, k, v = make_qkv(norm=2.5, v_dim=5)
    kpm = padding_mask(2, 29) if padded else None
    kw = dict(num_features=16, seed=7, is_causal=is_causal, key_padding_mask=kpm, **settings)
    implied = sa.implied_attention(q, k, **kw)
    out = sa.scatterbrain_attention(q, k, v, **kw)
    assert (out - implied @ expand_kv(v, 4)).abs().max() < 1e-12
    assert implied.min() >= 0
    assert (implied.sum(-1) - 1).abs().max() < 1e-12
    allowed = allowed_pairs(2, 4, 37, 29, is_causal, kpm)
    assert (implied[~allowed] == 0).all()


def test_lsh_duplicates_across_rounds_count_once():
    q, k, v = make_qkv(n_q=64, n_k=64)
    proj = sa.features.draw_hash_projections(1, 8, generator=torch.Generator().manual_seed(0))
    one = sa.scatterbrain_attention(q, k, v, num_features=16, bucket_size=8, hash_projections=proj, seed=1)
    twice = sa.scatterbrain_attention(q, k, v, num_features=16, bucket_size=8, n_hashes=2,
                                      hash_projections=proj.repeat(2, 1), seed=1)
    assert (one - twice).abs().max() < 1e-12


def test_lsh_buckets_are_equal_size_and_find_large_inner_products():
    q, k, _ = make_qkv(batch=1, heads=1, kv_heads=1, n_q=256, n_k=256, dim=16, seed=3)
    support = sa.attention_support(q, k, num_features=0, bucket_size=32, seed=0)
    assert (support.sum(-1) == 32).all()  # every query attends exactly one bucket of keys
    assert (support.sum(-2) == 32).all()
    # keys a query was bucketed with have larger inner products than the rest, on average
    scores = q @ k.transpose(-1, -2)
    assert scores[support].mean() > scores[~support].mean() + 0.5


def test_lsh_padded_keys_are_never_in_the_support():
    q, k, _ = make_qkv(n_q=50, n_k=50)
    kpm = padding_mask(2, 50)
    support = sa.attention_support(q, k, num_features=0, bucket_size=8, n_hashes=2, key_padding_mask=kpm, seed=0)
    assert not support[kpm[:, None, None, :].expand_as(support)].any()
    # query chunks are spread over the buckets that hold real keys: nobody is left without keys
    one_round = sa.attention_support(q, k, num_features=0, bucket_size=8, key_padding_mask=kpm, seed=0)
    counts = one_round.sum(-1)
    assert counts.min() >= 1 and counts.max() == 8
    assert (counts == 8).float().mean() > 0.7



@pytest.mark.parametrize("n_q", [50, 3])  # rank quantiles, and the few-queries plan
def test_one_round_lsh_key_lists_are_disjoint_or_repeat_the_previous_tile(n_q):
    """What the full-tile dk/dv kernel relies on to add each key's global low-rank term once: in a
    one-round LSH plan every key position sits in exactly one distinct key list, and a tile whose list
    is not the previous tile's shares no key with any earlier tile (key padding repeats a bucket's
    list over consecutive tiles; the kernel compares first entries)."""
    q, k, _ = make_qkv(batch=2, heads=4, kv_heads=2, n_q=n_q, n_k=50)
    kpm = padding_mask(2, 50)
    all_padding = kpm.clone()
    all_padding[1] = True  # batch 1 without real keys: every tile on bucket 0
    for mask in (None, kpm, all_padding):
        plan = sa.functional.prepare_call(q, k, k, num_features=8, bucket_size=8, key_padding_mask=mask,
                                          seed=0).plan
        k_index = plan.k_index[:, :, 0].expand(2, 2, -1, -1)  # (B, Hkv, T, tk)
        repeats = 0
        for b, h in ((b, h) for b in range(2) for h in range(2)):
            lists, seen = k_index[b, h], set()
            for t, keys in enumerate(lists.tolist()):
                if t > 0 and keys[0] == lists[t - 1, 0]:
                    assert keys == lists[t - 1].tolist()
                    repeats += 1
                    continue
                assert not seen & set(keys) - {50}
                seen |= set(keys)
            real = set(range(50)) if mask is None else set((~mask[b]).nonzero().flatten().tolist())
            assert real <= seen  # (lists past the real keys' buckets hold padding only, unattended)
        # repeats only with padding and rank quantiles (the few-queries plan's tiles are the buckets)
        assert (repeats > 0) == (mask is not None and n_q == 50)

# ---------------------------------------------------------------- random features


def test_local_plans_are_built_once_per_shape():
    """Eager local_plan returns the kept plan for the same sizes, window and device (the same
    tensors); another shape gets a plan of its own, equal to a fresh build."""
    from scatterattn import sparsity

    first = sparsity.local_plan(300, 280, window=40, device="cpu")
    again = sparsity.local_plan(300, 280, window=40, device=torch.device("cpu"))
    assert again is first
    other = sparsity.local_plan(300, 281, window=40, device="cpu")
    assert other is not first
    fresh = sparsity._build_local_plan(300, 281, 40, torch.device("cpu"), 64)
    assert torch.equal(other.q_index, fresh.q_index) and torch.equal(other.k_index, fresh.k_index)
    assert (other.band, other.num_queries, other.num_keys) == (fresh.band, 300, 281)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kept_local_plans_are_real_trainable_tensors(backend):
    """A plan first built in inference mode or under FakeTensorMode is not kept: training after a
    no-grad validation pass works, a shape pass with fake tensors leaves real calls real, and a fake
    pass after a real call does not see the kept real tensors."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from scatterattn import sparsity

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unsupported_reason(torch.zeros(1, 1, 1, 16, device=device), False)
    if backend == "triton" and reason is not None:
        pytest.skip(f"Triton kernels unavailable: {reason}")
    sparsity._KEPT_LOCAL_PLANS.clear()
    kw = dict(sparse="local", window=8, num_features=16, seed=0, backend=backend)
    mod = sa.ScatterbrainAttention(16, **kw).to(device)
    x = [torch.randn(1, 2, 40, 16, device=device) for _ in range(3)]
    with torch.inference_mode():
        mod(*x)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert mod(*[mode.from_tensor(t) for t in x]).shape == (1, 2, 40, 16)
    assert not sparsity._KEPT_LOCAL_PLANS
    xs = [t.clone().requires_grad_() for t in x]
    out = mod(*xs)
    out.sum().backward()
    assert type(out) is torch.Tensor and all(t.grad is not None for t in xs)
    assert len(sparsity._KEPT_LOCAL_PLANS) == 1
    with FakeTensorMode():
        fake_mod = sa.ScatterbrainAttention(16, **kw).to(device)
        out = fake_mod(*[torch.empty(1, 2, 40, 16, device=device) for _ in range(3)])
    assert isinstance(out, FakeTensor)


def test_feature_estimator_is_unbiased():
    """The mean of phi(x).phi(y) over independent orthogonal draws converges to exp(x.y)."""
    dim, m = 4, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([0.6, -0.3, 0.5, 0.2], dtype=F64)
    y = torch.tensor([0.4, 0.5, -0.2, 0.7], dtype=F64)
    target = math.exp(float(x @ y))
    n_draws = 64_000
    estimates = torch.empty(n_draws, dtype=F64)
    for start in range(0, n_draws, 16_000):  # one orthogonal block per draw
        gauss = torch.randn(16_000, dim, dim, generator=gen, dtype=F64)
        qmat, rmat = torch.linalg.qr(gauss)
        qmat = qmat * torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1)).unsqueeze(-2)
        w = qmat.transpose(-1, -2) * torch.randn(16_000, m, dim, generator=gen, dtype=F64).norm(dim=-1, keepdim=True)
        phi_x = torch.exp(w @ x - x @ x / 2) / math.sqrt(m)
        phi_y = torch.exp(w @ y - y @ y / 2) / math.sqrt(m)
        estimates[start:start + 16_000] = (phi_x * phi_y).sum(-1)
    errors = [abs(float(estimates[:n].mean()) - target) / target for n in (1_000, 64_000)]
    std_err = float(estimates.std()) / math.sqrt(n_draws) / target
    assert errors[1] < 4 * std_err  # within the Monte-Carlo noise of the full average
    assert errors[1] < 0.01


def test_draw_feature_matrix_matches_the_manual_construction():
    """draw_feature_matrix is the construction of the unbiasedness test (sign-fixed QR, chi norms)."""
    w = draw_feature_matrix(20, 8, generator=torch.Generator().manual_seed(11))
    assert w.shape == (20, 8) and w.dtype == torch.float32
    for block in (w[:8], w[8:16]):
        directions = block / block.norm(dim=-1, keepdim=True)
        assert (directions @ directions.t() - torch.eye(8)).abs().max() < 1e-5
    again = draw_feature_matrix(20, 8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(w, again)


def test_estimator_mean_matches_exp_with_the_package_draws():
    """Averaging the package's own draws over seeds also converges (guards draw_feature_matrix)."""
    dim, m, n_draws = 8, 8, 4000
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(dim, generator=gen, dtype=F64) * 0.3
    y = torch.randn(dim, generator=gen, dtype=F64) * 0.3
    w = torch.stack([draw_feature_matrix(m, dim, generator=gen) for _ in range(n_draws)]).double()
    est = (positive_features(x, w) * positive_features(y, w)).sum(-1)
    target = math.exp(float(x @ y))
    std_err = float(est.std()) / math.sqrt(n_draws)
    assert abs(float(est.mean()) - target) < 4 * std_err


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(dict(sparse="lsh", bucket_size=4, n_hashes=2, num_features=6), id="scatterbrain-lsh"),
        pytest.param(dict(sparse="local", window=4, num_features=6, is_causal=True), id="scatterbrain-local-causal"),
        pytest.param(dict(sparse="none", num_features=6, is_causal=True), id="performer-causal"),
        pytest.param(dict(sparse="lsh", bucket_size=4, num_features=0), id="lsh-only"),
    ],
)
def test_gradcheck(settings):
    q, k, v = make_qkv(batch=1, heads=2, kv_heads=1, n_q=9, n_k=7, dim=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kpm = torch.zeros(1, 7, dtype=torch.bool)
    kpm[0, 5] = True
    w = draw_feature_matrix(max(settings["num_features"], 1), 4, generator=torch.Generator().manual_seed(0))
    proj = sa.features.draw_hash_projections(settings.get("n_hashes", 1), 4, generator=torch.Generator().manual_seed(1))

    def fn(q, k, v):
        # the support is fixed by the projections; only the values move under gradcheck's steps
        return sa.scatterbrain_attention(
            q, k, v, key_padding_mask=kpm, feature_matrix=w if settings["num_features"] else None,
            hash_projections=proj, **settings,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- stability


@pytest.mark.parametrize("norm", [10.0, 30.0])
@pytest.mark.parametrize("settings", [dict(sparse="lsh"), dict(sparse="local", is_causal=True), dict(sparse="none", is_causal=True)])
def test_float32_is_finite_and_accurate_at_large_norms(norm, settings):
    q, k, v = make_qkv(batch=1, heads=2, kv_heads=2, n_q=300, n_k=300, dim=64, norm=norm, seed=4)
    kw = dict(num_features=64, bucket_size=32, window=32, seed=2, **settings)
    ref64 = sa.scatterbrain_attention(q, k, v, **kw)
    out32 = sa.scatterbrain_attention(q.float(), k.float(), v.float(), **kw)
    assert torch.isfinite(out32).all()
    rel = (out32.double() - ref64).norm() / ref64.norm()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = make_qkv(batch=1, heads=2, kv_heads=1, n_q=200, n_k=200, dim=32, norm=20.0, seed=5)
    kw = dict(num_features=32, bucket_size=16, seed=1)
    out = sa.scatterbrain_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # same rounded inputs in float64: only the output rounding and fp32 accumulation differ
    ref = sa.scatterbrain_attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), **kw)
    assert ((out.double() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sparse, is_causal", [("lsh", True), ("local", False)], ids=["lsh-causal", "local"])
def test_64k_tokens_half_precision_large_norms_finite(dtype, sparse, is_causal):
    """The reference (the CPU path, and the GPU path of causal calls) at 65,536 tokens in fp16 / bf16
    with query and key norms of 25 (logit bound 78 at head dim 64): output and every gradient finite."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 65536, 64, generator=gen) for _ in range(3))
    q, k = (x / x.norm(dim=-1, keepdim=True) * 25 for x in (q, k))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out = sa.scatterbrain_attention(q, k, v, sparse=sparse, is_causal=is_causal, seed=0, backend="reference")
    out.float().square().mean().backward()
    assert out.dtype == dtype
    for label, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), label


def test_memory_is_linear_in_sequence_length():
    """65,536 tokens run without anything of size N x N (that alone would be 16 GiB in fp32)."""
    import resource
    import subprocess
    import sys

    code = (
        "import resource, torch, scatterattn as sa\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "q = torch.randn(1, 1, 65536, 16); k = torch.randn(1, 1, 65536, 16); v = torch.randn(1, 1, 65536, 16)\n"
        "o = sa.scatterbrain_attention(q, k, v, num_features=32, bucket_size=32, seed=0)\n"
        "assert torch.isfinite(o).all()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    del resource
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_mib = float(result.stdout.strip().splitlines()[-1])
    assert peak_mib < 1024, f"peak RSS grew by {peak_mib:.0f} MiB"


def test_few_queries_attend_the_bucket_their_hash_falls_in():
    """Decoding (fewer queries than buckets): each query attends the key bucket that contains its
    hash position among the sorted key hashes, not the lowest bucket by rank."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 512, 16, generator=gen, dtype=F64)
    queries = torch.randn(1, 1, 40, 16, generator=gen, dtype=F64)
    supports = [sa.attention_support(queries[:, :, i:i + 1], k, num_features=0, bucket_size=64, seed=0)[0, 0, 0]
                for i in range(40)]
    assert all(int(s.sum()) == 64 for s in supports)
    assert len({tuple(s.nonzero().flatten().tolist()) for s in supports}) >= 4  # not one fixed bucket
    # the plan against an explicit search: hash one query like lsh_plan and find its bucket
    plan = sa.functional.prepare_call(queries[:, :, :1], k, k, num_features=0, bucket_size=64, seed=0).plan
    t = int((plan.q_index[0, 0, 0] < 1).any(-1).nonzero())  # the tile holding the query
    assert torch.equal(supports[0].nonzero().flatten().sort().values, plan.k_index[0, 0, 0, t].sort().values)


@pytest.mark.parametrize("sparse", ["none", "lsh", "local"])
def test_causal_rows_with_underflowing_features_run_in_float64(sparse):
    """Causal rows see only a prefix of the keys but the key stabiliser is the max over all of them:
    with sink-like first keys of large norm (|k| ~ 60) the float32 features of the first rows
    underflow (all-zero rows before). Such calls rerun in float64 (counted): out and gradients of
    float32 inputs equal the float64 call's; ordinary inputs (|k| ~ 8) stay in float32."""
    from scatterattn import reference

    gen = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, 2, 48, 64, generator=gen) for _ in range(4))
    kw = dict(num_features=64, sparse=sparse, bucket_size=16, window=4, seed=0, is_causal=True,
              backend="reference")
    before = reference.FALLBACKS["causal_float64"]
    sa.scatterbrain_attention(q, k, v, **kw)
    assert reference.FALLBACKS["causal_float64"] == before
    k[:, :, :8] *= 8.0
    results = []
    for dtype in (torch.float32, torch.float64):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = sa.scatterbrain_attention(*xs, **kw)
        out.backward(grad_out.to(dtype))
        results.append([out.detach(), *(x.grad for x in xs)])
    assert reference.FALLBACKS["causal_float64"] == before + 1
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        err = float((a.double() - b).norm() / b.norm())
        assert torch.isfinite(a).all() and err < 1e-5, (name, err)
    assert (results[0][0].abs().sum(-1) > 0).all()


def test_causal_float64_rerun_under_torch_compile():
    """Traced (fullgraph), the float32 / float64 choice has no branch: both are computed and one
    is selected, so compiled calls give the eager results on both sides of the threshold."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(3))
    sinks = k.clone()
    sinks[:, :, :6] *= 10.0
    w = draw_feature_matrix(32, 32, generator=gen)  # (a seed would make a generator inside the graph)
    fn = functools.partial(sa.scatterbrain_attention, num_features=32, feature_matrix=w, sparse="none",
                           is_causal=True, backend="reference")
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    root = 32 ** -0.25
    gaps = [float(sa.reference.causal_feature_gap(q.unsqueeze(2) * root, keys * root, w)) for keys in (k, sinks)]
    assert gaps[0] < sa.reference.CAUSAL_GAP_FLOAT32 < gaps[1], gaps  # one call on each side
    for keys in (k, sinks):
        want = fn(q.double(), keys.double(), v.double())
        for got in (compiled(q, keys, v), fn(q, keys, v)):
            assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_causal_calls_where_values_cannot_be_read():
    """The causal float64 check reads a value on the host; where that is impossible (meta tensors,
    FakeTensorMode, make_fx tracing, vmap) it computes both precisions and selects instead of
    failing, and vmap gives the per-sample results."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    w = draw_feature_matrix(8, 8, generator=torch.Generator().manual_seed(0))
    fn = functools.partial(sa.scatterbrain_attention, num_features=8, feature_matrix=w, sparse="local", window=4,
                           is_causal=True, backend="reference")
    meta = torch.randn(1, 2, 16, 8, device="meta")
    assert fn(meta, meta, meta).shape == (1, 2, 16, 8)
    with FakeTensorMode(allow_non_fake_inputs=True):  # (w is real)
        fake = torch.randn(1, 2, 16, 8)
        assert isinstance(fn(fake, fake, fake), FakeTensor)
    x = torch.randn(3, 1, 2, 16, 8, generator=torch.Generator().manual_seed(1))
    traced = make_fx(lambda q: fn(q, q, q))(x[0])
    assert torch.allclose(traced(x[0]), fn(x[0], x[0], x[0]), atol=1e-6)
    batched = torch.func.vmap(lambda q: fn(q, q, q))(x)
    assert torch.allclose(batched, torch.stack([fn(t, t, t) for t in x]), atol=1e-5)


@pytest.mark.parametrize("randomness", ["error", "different", "same"])
def test_vmap_draws_the_seeded_parameters_once(randomness):
    """Under torch.func.vmap a seeded call draws its feature matrix and hash projections once, as
    outside it: every sample matches the un-vmapped call (before, vmap refused the draws, or drew
    other features for each sample with randomness='different')."""
    k, v = (torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(i)) for i in range(2))
    x = torch.randn(3, 1, 2, 24, 8, generator=torch.Generator().manual_seed(2))
    call = functools.partial(sa.scatterbrain_attention, key=k, value=v, num_features=8, bucket_size=8, seed=0)
    got = torch.func.vmap(lambda q: call(q), randomness=randomness)(x)
    assert torch.allclose(got, torch.stack([call(q) for q in x]), atol=1e-6)
