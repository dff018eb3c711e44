"""Input validation of the functional API, and odd-but-valid inputs that must just work.

Bad input must raise an error that names the offending argument and says what was expected;
valid-but-unusual shapes, dtypes and masks must give finite output of the right shape (and, where
the approximation is exact, the right values).
"""

from __future__ import annotations

import pytest
import torch

import scatterattn
from scatterattn import (
    ScatterbrainAttention,
    dense_attention,
    local_attention,
    lsh_attention,
    performer_attention,
    scatterbrain_attention,
)

B, H, N, D = 2, 2, 16, 8

# Small settings so each call is cheap; every function gets its own relevant knobs.
FUNCS = {
    "scatterbrain": lambda q, k, v, **kw: scatterbrain_attention(
        q, k, v, **{"num_features": 16, "bucket_size": 4, "seed": 0, **kw}
    ),
    "dense": lambda q, k, v, **kw: dense_attention(q, k, v, **kw),
    "performer": lambda q, k, v, **kw: performer_attention(q, k, v, **{"num_features": 16, "seed": 0, **kw}),
    "lsh": lambda q, k, v, **kw: lsh_attention(q, k, v, **{"bucket_size": 4, "seed": 0, **kw}),
    "local": lambda q, k, v, **kw: local_attention(q, k, v, **{"window": 4, **kw}),
}
ALL = list(FUNCS)
APPROX = [name for name in FUNCS if name != "dense"]  # the ones that take backend=


def qkv(b=B, h=H, n=N, d=D, *, hkv=None, s=None, dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    s = n if s is None else s
    dv = d if dv is None else dv
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, s, dv, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


# --------------------------------------------------------------------------------------------
# q / k / v shape, dtype and device errors: every entry point validates the same way.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ALL)
def test_query_rank_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query must have 4 dims .*got shape \(2, 16, 8\)"):
        FUNCS[fn](q[0], k, v)


@pytest.mark.parametrize("fn", ALL)
def test_key_and_value_rank_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key must have 4 dims"):
        FUNCS[fn](q, k[0], v)
    with pytest.raises(ValueError, match=r"value must have 4 dims"):
        FUNCS[fn](q, k, v.unsqueeze(0))


@pytest.mark.parametrize("fn", ALL)
def test_non_tensor_input(fn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"key must be a torch.Tensor, got list"):
        FUNCS[fn](q, k.tolist(), v)


@pytest.mark.parametrize("fn", ALL)
def test_batch_mismatch(fn):
    q, k, v = qkv()
    k3, v3 = qkv(b=3)[1:]
    with pytest.raises(ValueError, match=r"batch sizes differ: query 2, key 3, value 3"):
        FUNCS[fn](q, k3, v3)
    with pytest.raises(ValueError, match=r"batch sizes differ: query 2, key 2, value 3"):
        FUNCS[fn](q, k, v3)


@pytest.mark.parametrize("fn", ALL)
def test_key_value_head_count_mismatch(fn):
    q, k, v = qkv(h=4)
    with pytest.raises(ValueError, match=r"key has 4 heads but value has 2"):
        FUNCS[fn](q, k, v[:, :2])


@pytest.mark.parametrize("fn", ALL)
def test_query_heads_not_multiple_of_kv_heads(fn):
    q, k, v = qkv(h=6, hkv=4)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        FUNCS[fn](q, k, v)


@pytest.mark.parametrize("fn", ALL)
def test_zero_kv_heads(fn):
    q, k, v = qkv(h=2, hkv=0)
    with pytest.raises(ValueError, match=r"multiple of key/value heads \(0\)"):
        FUNCS[fn](q, k, v)


@pytest.mark.parametrize("fn", ALL)
def test_key_value_seq_len_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key has seq_len 16 but value has 15"):
        FUNCS[fn](q, k, v[:, :, :15])


@pytest.mark.parametrize("fn", ALL)
def test_query_key_head_dim_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"head-dim mismatch: query head_dim 8, key head_dim 7"):
        FUNCS[fn](q, k[..., :7], v)


@pytest.mark.parametrize("fn", ALL)
def test_empty_sequences(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query seq_len must be >= 1, got 0"):
        FUNCS[fn](q[:, :, :0], k, v)
    with pytest.raises(ValueError, match=r"key seq_len must be >= 1, got 0"):
        FUNCS[fn](q, k[:, :, :0], v[:, :, :0])


@pytest.mark.parametrize("fn", ALL)
def test_integer_query(fn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"query must be a floating tensor .*got torch.int64"):
        FUNCS[fn](q.long(), k, v)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize(
    "which, dtype, pattern",
    [
        ("key", torch.float64, r"key dtype torch.float64 differs from query dtype torch.float32"),
        ("value", torch.float16, r"value dtype torch.float16 differs from query dtype torch.float32"),
        ("value", torch.bfloat16, r"value dtype torch.bfloat16 differs from query dtype torch.float32"),
    ],
)
def test_qkv_dtype_differs(fn, which, dtype, pattern):
    q, k, v = qkv()
    if which == "key":
        k = k.to(dtype)
    else:
        v = v.to(dtype)
    with pytest.raises(TypeError, match=pattern):
        FUNCS[fn](q, k, v)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("which", ["key", "value"])
def test_qkv_different_devices(fn, which):
    # No second real device on a CPU-only box: the 'meta' device stands in for one.
    q, k, v = qkv()
    if which == "key":
        k = k.to("meta")
    else:
        v = v.to("meta")
    with pytest.raises(ValueError, match=rf"{which} is on meta but query is on cpu"):
        FUNCS[fn](q, k, v)


# --------------------------------------------------------------------------------------------
# Approximation settings.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["scatterbrain", "lsh"])
@pytest.mark.parametrize("bad", [0, -3])
def test_bucket_size_below_one(fn, bad):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"bucket_size must be >= 1, got {bad}"):
        FUNCS[fn](q, k, v, bucket_size=bad)


@pytest.mark.parametrize("fn", ["scatterbrain", "lsh"])
@pytest.mark.parametrize("bad, tname", [(2.5, "float"), (True, "bool"), ("4", "str")])
def test_bucket_size_not_int(fn, bad, tname):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"bucket_size must be an int, got {tname}"):
        FUNCS[fn](q, k, v, bucket_size=bad)


@pytest.mark.parametrize("fn", ["scatterbrain", "performer"])
def test_negative_num_features(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"num_features must be >= 0, got -1"):
        FUNCS[fn](q, k, v, num_features=-1)


@pytest.mark.parametrize("fn", ["scatterbrain", "lsh"])
@pytest.mark.parametrize("bad", [0, -1])
def test_n_hashes_below_one(fn, bad):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"n_hashes must be >= 1, got {bad}"):
        FUNCS[fn](q, k, v, n_hashes=bad)


@pytest.mark.parametrize("fn", ["scatterbrain", "local"])
def test_negative_window(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"window must be >= 0, got -1"):
        FUNCS[fn](q, k, v, window=-1, **({"sparse": "local"} if fn == "scatterbrain" else {}))


def test_unknown_sparse_source():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"sparse must be one of \('lsh', 'local', 'none'\), got 'bigbird'"):
        scatterbrain_attention(q, k, v, sparse="bigbird")


@pytest.mark.parametrize("fn", ["scatterbrain", "performer"])
def test_unknown_feature_type(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"feature_type must be one of \('positive', 'hyperbolic'\), got 'relu'"):
        FUNCS[fn](q, k, v, feature_type="relu")


@pytest.mark.parametrize("fn", ["scatterbrain", "performer"])
def test_nothing_to_attend_with(fn):
    q, k, v = qkv()
    kw = {"sparse": "none"} if fn == "scatterbrain" else {}
    with pytest.raises(ValueError, match=r"num_features=0 with sparse='none'"):
        FUNCS[fn](q, k, v, num_features=0, **kw)


# --------------------------------------------------------------------------------------------
# key_padding_mask, scale, backend, explicit random parameters.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("shape", [(B,), (B, N + 1), (B + 1, N), (B, 1, N), (N, B)])
def test_key_padding_mask_wrong_shape(fn, shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, key_seq_len\) = \(2, 16\)"):
        FUNCS[fn](q, k, v, key_padding_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_key_padding_mask_wrong_dtype(fn, dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"key_padding_mask must be a bool tensor .*got {dtype}"):
        FUNCS[fn](q, k, v, key_padding_mask=torch.zeros(B, N, dtype=dtype))


@pytest.mark.parametrize("fn", ALL)
def test_key_padding_mask_not_tensor(fn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"key_padding_mask must be a torch.Tensor, got list"):
        FUNCS[fn](q, k, v, key_padding_mask=[[False] * N] * B)


@pytest.mark.parametrize("fn", ALL)
def test_key_padding_mask_wrong_device(fn):
    q, k, v = qkv()
    mask = torch.zeros(B, N, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta but query is on cpu"):
        FUNCS[fn](q, k, v, key_padding_mask=mask)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("bad", [-1.0, -1e-30, float("nan"), float("inf"), "0.5", True, torch.tensor(0.5)])
def test_bad_scale(fn, bad):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale must be a finite number >= 0 or None \(as SDPA's\), got"):
        FUNCS[fn](q, k, v, scale=bad)


@pytest.mark.parametrize("fn", ["dense", "scatterbrain", "performer"])  # (lsh / local: over their support)
def test_scale_zero_is_uniform_attention_as_in_sdpa(fn):
    """scale=0 (accepted by SDPA): every score is 0, so each row averages the values."""
    q, k, v = qkv()
    out = FUNCS[fn](q, k, v, scale=0)
    assert torch.allclose(out, v.mean(-2, keepdim=True).expand_as(out), atol=1e-5)


def test_numpy_scalars_are_accepted():
    """numpy integers for the integer settings and numpy floats for scale, as for Python numbers."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    got = scatterbrain_attention(q, k, v, num_features=np.int64(16), bucket_size=np.int32(4), n_hashes=np.int64(1),
                                 scale=np.float32(0.25), seed=np.int64(3))
    want = scatterbrain_attention(q, k, v, num_features=16, bucket_size=4, scale=float(np.float32(0.25)), seed=3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad, error, message", [
    (1.7, TypeError, r"seed must be an int or None, got float \(1.7\)"),
    ("abc", TypeError, r"seed must be an int or None, got str"),
    (True, TypeError, r"seed must be an int or None, got bool"),
])
def test_bad_seed(bad, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        scatterbrain_attention(q, k, v, num_features=16, bucket_size=4, seed=bad)
    with pytest.raises(error, match=message):
        ScatterbrainAttention(D, seed=bad)


def test_seed_range():
    """The functional API takes any seed torch.Generator.manual_seed takes (torch.seed() returns
    values up to 2**64 - 1); a module keeps its seed in an int64 buffer, so it stops at 2**63."""
    q, k, v = qkv()
    scatterbrain_attention(q, k, v, num_features=16, bucket_size=4, seed=2**64 - 1)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\) \(as torch.Generator.manual_seed\)"):
        scatterbrain_attention(q, k, v, num_features=16, bucket_size=4, seed=2**64)
    ScatterbrainAttention(D, seed=2**63 - 1)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*63\) \(an int64\), got 9223372036854775808"):
        ScatterbrainAttention(D, seed=2**63)


@pytest.mark.parametrize("fn", APPROX)
def test_bad_backend(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"):
        FUNCS[fn](q, k, v, backend="cuda")


@pytest.mark.parametrize("fn", APPROX)
def test_triton_backend_refuses_inputs_it_cannot_run(fn, monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: .*float64"):
        FUNCS[fn](q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: causal"):
        FUNCS[fn](q, k, v, backend="triton", is_causal=True)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: .*CUDA"):
            FUNCS[fn](q, k, v, backend="triton")


@pytest.mark.parametrize("fn", ["scatterbrain", "performer"])
@pytest.mark.parametrize("shape", [(16, D + 1), (15, D), (D, 16), (16,)])
def test_feature_matrix_wrong_shape(fn, shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"feature_matrix must have shape \(16, 8\), got"):
        FUNCS[fn](q, k, v, feature_matrix=torch.randn(shape))


def test_feature_matrix_not_floating_or_not_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"feature_matrix must be a floating tensor, got torch.int64"):
        scatterbrain_attention(q, k, v, num_features=16, feature_matrix=torch.zeros(16, D, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"feature_matrix must be a torch.Tensor of shape \(16, 8\)"):
        scatterbrain_attention(q, k, v, num_features=16, feature_matrix=[[0.0] * D] * 16)


@pytest.mark.parametrize("fn", ["scatterbrain", "lsh"])
@pytest.mark.parametrize("shape", [(1, D), (2, D + 2), (1, D + 3), (D + 2,)])
def test_hash_projections_wrong_shape(fn, shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"hash_projections must have shape \(1, 10\), got"):
        FUNCS[fn](q, k, v, hash_projections=torch.randn(shape))


def test_hash_projections_shape_follows_n_hashes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"hash_projections must have shape \(3, 10\), got \(1, 10\)"):
        lsh_attention(q, k, v, n_hashes=3, hash_projections=torch.randn(1, D + 2))
    out = lsh_attention(q, k, v, n_hashes=3, bucket_size=4, hash_projections=torch.randn(3, D + 2))
    assert out.shape == q.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Odd but valid input: finite output of the right shape, exact where the approximation is exact.
# --------------------------------------------------------------------------------------------

ODD_SHAPES = {
    # name: (b, h, hkv, n, s, d, dv)
    "N=1": (1, 2, 2, 1, 9, 8, 8),
    "S=1": (1, 2, 2, 9, 1, 8, 8),
    "N=S=1": (1, 1, 1, 1, 1, 8, 8),
    "N<S": (2, 2, 2, 5, 37, 8, 8),
    "N>S": (2, 2, 2, 37, 5, 8, 8),
    "N=130,bucket64": (1, 2, 2, 130, 130, 8, 8),
    "batch3": (3, 2, 2, 12, 12, 8, 8),
    "gqa6/2": (2, 6, 2, 12, 12, 8, 8),
    "gqa6/1": (2, 6, 1, 12, 12, 8, 8),
    "dv!=d": (2, 2, 1, 12, 20, 8, 5),
}

# name: (function, settings); the LSH bucket is overridden where a test needs small buckets.
ODD_SETTINGS = {
    "scatterbrain-lsh": (scatterbrain_attention, dict(num_features=32, bucket_size=64, seed=1)),
    "scatterbrain-lsh-2rounds": (scatterbrain_attention, dict(num_features=32, bucket_size=4, n_hashes=2, seed=1)),
    "scatterbrain-local": (
        scatterbrain_attention,
        dict(num_features=32, feature_type="hyperbolic", sparse="local", window=6, seed=1),
    ),
    "performer": (performer_attention, dict(num_features=32, seed=1)),
    "lsh": (lsh_attention, dict(bucket_size=64, seed=1)),
    "lsh-small-bucket": (lsh_attention, dict(bucket_size=4, n_hashes=2, seed=1)),
    "local": (local_attention, dict(window=6)),
    "dense": (dense_attention, {}),
}


def odd_call(name, q, k, v, **kw):
    fn, settings = ODD_SETTINGS[name]
    return fn(q, k, v, **{**settings, **kw})


@pytest.mark.parametrize("call", list(ODD_SETTINGS))
@pytest.mark.parametrize("shape", list(ODD_SHAPES))
def test_odd_shapes_finite_and_right_shape(call, shape):
    b, h, hkv, n, s, d, dv = ODD_SHAPES[shape]
    q, k, v = qkv(b, h, n, d, hkv=hkv, s=s, dv=dv)
    out = odd_call(call, q, k, v)
    assert out.shape == (b, h, n, dv)
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", list(ODD_SHAPES))
def test_odd_shapes_exact_when_support_is_everything(shape):
    # A window wider than 2 * max(N, S), or one bucket holding every key, makes the sparse part
    # cover every pair: the result must then be exact softmax attention, for every odd shape.
    b, h, hkv, n, s, d, dv = ODD_SHAPES[shape]
    q, k, v = qkv(b, h, n, d, hkv=hkv, s=s, dv=dv, dtype=torch.float64)
    want = dense_attention(q, k, v)
    wide = 2 * max(n, s) + 2
    torch.testing.assert_close(local_attention(q, k, v, window=wide), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lsh_attention(q, k, v, bucket_size=s, seed=3), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        scatterbrain_attention(q, k, v, num_features=16, sparse="local", window=wide, seed=3),
        want,
        rtol=1e-10,
        atol=1e-10,
    )


def test_bucket_larger_than_seq_len_is_exact():
    q, k, v = qkv(1, 2, 10, 8, s=7, dtype=torch.float64)
    out = lsh_attention(q, k, v, bucket_size=1000, seed=0)
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_window_larger_than_seq_len_is_exact():
    q, k, v = qkv(1, 2, 10, 8, s=7, dtype=torch.float64)
    out = local_attention(q, k, v, window=1000)
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_window_zero_is_diagonal():
    # window=0 keeps |i - j| <= 0: each query sees only its own position, so out[i] == v[i].
    q, k, v = qkv(1, 2, 10, 8, dtype=torch.float64)
    out = local_attention(q, k, v, window=0)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-15)


@pytest.mark.parametrize("call", list(ODD_SETTINGS))
def test_fully_padded_batch_element_gives_zeros(call):
    q, k, v = qkv(2, 2, 12, 8, s=12)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0] = True  # every key of batch element 0 is padding
    mask[1, 7:] = True  # batch element 1 is partly padded
    out = odd_call(call, q, k, v, key_padding_mask=mask)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0


@pytest.mark.parametrize("call", list(ODD_SETTINGS))
def test_fully_padded_batch_element_has_finite_zero_gradients(call):
    # The all-masked row must not turn into NaN on the way back either; padded keys get no gradient.
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 12, 8, s=12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0] = True
    mask[1, 7:] = True
    out = odd_call(call, q, k, v, key_padding_mask=mask)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(k.grad[1, :, 7:], torch.zeros_like(k.grad[1, :, 7:]))
    assert torch.equal(v.grad[1, :, 7:], torch.zeros_like(v.grad[1, :, 7:]))
    assert v.grad[1, :, :7].abs().sum() > 0


def test_lsh_partial_padding_leaves_no_query_without_keys():
    # Half the keys padded: every query still has 8 real keys, so with bucket_size=4 each query
    # should attend 4 real keys and no output row may be all zeros.
    q, k, v = qkv(1, 1, 16, 8, s=16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 8:] = True
    out = lsh_attention(q, k, v, bucket_size=4, seed=0, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    empty_rows = (out.abs().sum(-1) == 0).sum().item()
    assert empty_rows == 0, f"{empty_rows} of 16 query rows attend no key"


def test_padded_keys_take_no_part():
    # Padded keys must not influence the result: garbage in padded k/v positions changes nothing.
    q, k, v = qkv(2, 2, 12, 8, dtype=torch.float64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 9:] = True
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:] = 50.0
    v2[:, :, 9:] = -1e3
    for fn in (
        lambda k_, v_: dense_attention(q, k_, v_, key_padding_mask=mask),
        lambda k_, v_: local_attention(q, k_, v_, window=6, key_padding_mask=mask),
        lambda k_, v_: performer_attention(q, k_, v_, num_features=16, seed=2, key_padding_mask=mask),
    ):
        torch.testing.assert_close(fn(k2, v2), fn(k, v), rtol=1e-10, atol=1e-10)
    # A dense result over the unpadded keys only.
    torch.testing.assert_close(
        dense_attention(q, k2, v2, key_padding_mask=mask), dense_attention(q, k[:, :, :9], v[:, :, :9])
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("call", list(ODD_SETTINGS))
def test_half_precision_inputs(call, dtype):
    q, k, v = qkv(2, 2, 24, 8, hkv=1, dtype=dtype)
    out = odd_call(call, q, k, v)
    assert out.dtype == dtype
    assert out.shape == q.shape
    assert torch.isfinite(out).all()
    # Computation runs in float32, so the result matches the float32 run to the output rounding.
    ref = odd_call(call, q.float(), k.float(), v.float())
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Randomness: seed and generator.
# --------------------------------------------------------------------------------------------


def _seeded(q, k, v, **kw):
    return scatterbrain_attention(q, k, v, num_features=16, bucket_size=4, **kw)


def test_same_seed_same_output():
    q, k, v = qkv(n=64)
    assert torch.equal(_seeded(q, k, v, seed=7), _seeded(q, k, v, seed=7))
    assert torch.equal(lsh_attention(q, k, v, bucket_size=4, seed=7), lsh_attention(q, k, v, bucket_size=4, seed=7))
    assert torch.equal(
        performer_attention(q, k, v, num_features=16, seed=7), performer_attention(q, k, v, num_features=16, seed=7)
    )


def test_different_seed_different_output():
    q, k, v = qkv(n=64)
    a = lsh_attention(q, k, v, bucket_size=4, seed=1)
    b = lsh_attention(q, k, v, bucket_size=4, seed=2)
    assert not torch.allclose(a, b)
    assert not torch.allclose(_seeded(q, k, v, seed=1), _seeded(q, k, v, seed=2))
    assert not torch.allclose(
        performer_attention(q, k, v, num_features=16, seed=1), performer_attention(q, k, v, num_features=16, seed=2)
    )


def test_generator_works_like_seed():
    q, k, v = qkv(n=64)
    for call in (
        lambda **kw: _seeded(q, k, v, **kw),
        lambda **kw: lsh_attention(q, k, v, bucket_size=4, **kw),
        lambda **kw: performer_attention(q, k, v, num_features=16, **kw),
    ):
        by_seed = call(seed=11)
        by_gen = call(generator=torch.Generator().manual_seed(11))
        assert torch.equal(by_seed, by_gen)
        assert not torch.allclose(by_gen, call(generator=torch.Generator().manual_seed(12)))


def test_generator_is_advanced_not_reset():
    # Two calls sharing one generator draw different parameters (the generator state moves on).
    q, k, v = qkv(n=64)
    gen = torch.Generator().manual_seed(3)
    first = lsh_attention(q, k, v, bucket_size=4, generator=gen)
    second = lsh_attention(q, k, v, bucket_size=4, generator=gen)
    assert not torch.allclose(first, second)


def test_no_seed_uses_global_rng():
    q, k, v = qkv(n=64)
    torch.manual_seed(123)
    a = _seeded(q, k, v)
    torch.manual_seed(123)
    b = _seeded(q, k, v)
    c = _seeded(q, k, v)  # global RNG has moved on
    assert torch.equal(a, b)
    assert not torch.allclose(b, c)


def test_explicit_parameters_override_seed():
    # Passing both random matrices means nothing is drawn: the seed then has no effect.
    q, k, v = qkv(n=64)
    w = torch.randn(16, D)
    p = torch.randn(1, D + 2)
    a = _seeded(q, k, v, seed=1, feature_matrix=w, hash_projections=p)
    b = _seeded(q, k, v, seed=2, feature_matrix=w, hash_projections=p)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Grouped-query heads: same result as repeating k / v (which the implementation must not do).
# --------------------------------------------------------------------------------------------

GQA_CALLS = {
    "scatterbrain-local": lambda q, k, v: scatterbrain_attention(
        q, k, v, num_features=16, sparse="local", window=6, seed=4
    ),
    "scatterbrain-local-hyperbolic-causal": lambda q, k, v: scatterbrain_attention(
        q, k, v, num_features=16, feature_type="hyperbolic", sparse="local", window=6, seed=4, is_causal=True
    ),
    "performer": lambda q, k, v: performer_attention(q, k, v, num_features=16, seed=4),
    "local": lambda q, k, v: local_attention(q, k, v, window=6),
    "dense": lambda q, k, v: dense_attention(q, k, v),
    # One bucket holding every key: the LSH support is all pairs whatever the hash says.
    "scatterbrain-lsh-one-bucket": lambda q, k, v: scatterbrain_attention(
        q, k, v, num_features=16, bucket_size=k.shape[2], seed=4
    ),
}


@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("call", list(GQA_CALLS))
def test_gqa_equals_repeated_kv(call, hkv):
    # With small LSH buckets the two runs may legitimately differ: the XBOX+ normaliser
    # M^2 = max|q|^2 + max|k|^2 is taken per kv head over its whole query group, so repeating
    # k / v to H heads gives each query head its own (smaller) M and hence different buckets.
    # So LSH appears here only with a bucket covering every key; 'local' and 'none' have
    # hash-free supports, and their outputs must agree to float64 rounding.
    h = 6
    q, k, v = qkv(2, h, 20, 8, hkv=hkv, s=20, dv=5, dtype=torch.float64)
    grouped = GQA_CALLS[call](q, k, v)
    rep = h // hkv
    repeated = GQA_CALLS[call](q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))
    assert grouped.shape == (2, h, 20, 5)
    torch.testing.assert_close(grouped, repeated, rtol=1e-12, atol=1e-12)


def test_gqa_heads_use_their_own_kv_group():
    # Query head h reads kv head h // (H / Hkv): changing kv head 1 must only change heads 3..5.
    q, k, v = qkv(1, 6, 10, 8, hkv=2, dtype=torch.float64)
    base = local_attention(q, k, v, window=4)
    v2 = v.clone()
    v2[:, 1] += 1.0
    moved = local_attention(q, k, v2, window=4)
    assert torch.equal(moved[:, :3], base[:, :3])
    torch.testing.assert_close(moved[:, 3:], base[:, 3:] + 1.0, rtol=1e-12, atol=1e-12)


def test_lsh_gqa_matches_repeat_when_norms_are_equal():
    # The one difference between grouped and repeated LSH is M; when every query and key has the
    # same norm, M is the same per group and per head, so even small buckets must agree.
    q, k, v = qkv(1, 4, 32, 8, hkv=2, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    grouped = lsh_attention(q, k, v, bucket_size=4, seed=9)
    repeated = lsh_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), bucket_size=4, seed=9)
    torch.testing.assert_close(grouped, repeated, rtol=1e-12, atol=1e-12)


def test_public_names_exported():
    for name in ("scatterbrain_attention", "dense_attention", "performer_attention", "lsh_attention", "local_attention"):
        assert callable(getattr(scatterattn, name))
        assert name in scatterattn.__all__


@pytest.mark.parametrize("backend, is_causal", [("reference", False), ("reference", True), ("triton", False)],
                         ids=["reference", "reference-causal", "triton"])  # (the kernels are non-causal)
@pytest.mark.parametrize("shape", [(0, H), (B, 0)], ids=["batch-0", "no-query-heads"])
def test_calls_with_no_query_rows_return_the_empty_output(shape, backend, is_causal):
    """A batch of 0 (or no query heads) gives the empty (B, H, N, Dv) output in the inputs' graph, as
    SDPA does, on every entry point; before, the LSH plan, the causal check and the chained
    backward failed with reshape or reduction errors."""
    from scatterattn import ChainedLowRankAttention, lora

    b, h = shape
    calls = {name: (lambda f: lambda q, k, v, **kw: f(q, k, v, backend=backend, **kw))(FUNCS[name]) for name in APPROX}
    calls["dense"] = FUNCS["dense"]
    calls["chained"] = lambda q, k, v, **kw: lora.chained_lowrank_attention(q, k, v, num_features=8, seed=0,
                                                                            backend=backend, **kw)
    calls["module"] = ScatterbrainAttention(D, num_features=8, bucket_size=4, seed=0, backend=backend)
    calls["chained module"] = ChainedLowRankAttention(D, num_features=8, seed=0, backend=backend)
    pad = torch.zeros(b, N + 3, dtype=torch.bool)
    for name, call in calls.items():
        q, k, v = (t.requires_grad_() for t in qkv(b, h, hkv=1, s=N + 3, dv=5))
        out = call(q, k, v, is_causal=is_causal, key_padding_mask=pad)
        assert out.shape == (b, h, N, 5), name
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and not k.grad.any(), name
    q, k, v = qkv(b, h, hkv=1)
    for call in (FUNCS["scatterbrain"], lora.chained_lowrank_attention):  # the backend is still checked
        with pytest.raises(ValueError, match="backend must be one of"):
            call(q, k, v, backend="bogus")
