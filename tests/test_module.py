"""ScatterbrainAttention: buffers, state_dict, seeding, redraw policy, casting, gradients."""

from __future__ import annotations

import pytest
import torch

from scatterattn import ScatterbrainAttention, scatterbrain_attention

D = 8
RANDOM = ("feature_matrix", "hash_projections")


def qkv(b=2, h=2, n=32, d=D, *, hkv=None, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def make(seed=0, **kw):
    settings = dict(num_features=16, bucket_size=4, seed=seed)
    settings.update(kw)
    return ScatterbrainAttention(D, **settings)


def snapshot(m):
    return {name: getattr(m, name).clone() for name in RANDOM}


def same_buffers(m, snap):
    return all(torch.equal(getattr(m, name), snap[name]) for name in RANDOM)


def changed_all(m, snap):
    return all(not torch.equal(getattr(m, name), snap[name]) for name in RANDOM)


# ------------------------------------------------------------------------------------------------
# Buffers and state_dict.
# ------------------------------------------------------------------------------------------------


def test_random_matrices_are_float32_buffers_in_state_dict():
    m = make(n_hashes=3)
    sd = m.state_dict()
    for name in RANDOM:
        assert name in dict(m.named_buffers())
        assert name in sd
        assert sd[name].dtype == torch.float32
        assert not getattr(m, name).requires_grad
    assert sd["feature_matrix"].shape == (16, D)
    assert sd["hash_projections"].shape == (3, D + 2)
    assert list(m.parameters()) == []


def test_state_dict_round_trip_into_differently_seeded_module():
    q, k, v = qkv()
    src = make(seed=1)
    dst = make(seed=2)
    assert not torch.equal(src(q, k, v), dst(q, k, v))  # the seeds really differ
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(q, k, v), src(q, k, v))
    for name in RANDOM:
        assert torch.equal(getattr(dst, name), getattr(src, name))


def test_state_dict_round_trip_keeps_redraw_sequence():
    # The seed and the draw / step counters travel too, so the reloaded module continues the same
    # sequence of matrices as the original.
    src = make(seed=5, redraw_interval=2)
    q, k, v = qkv(n=8)
    for _ in range(3):
        src(q, k, v)
    dst = make(seed=6, redraw_interval=2)
    dst.load_state_dict(src.state_dict())
    for _ in range(4):
        assert torch.equal(src(q, k, v), dst(q, k, v))
        assert same_buffers(dst, snapshot(src))
    src.redraw()
    dst.redraw()
    assert same_buffers(dst, snapshot(src))


def test_fixed_seed_reproducible_across_constructions():
    q, k, v = qkv()
    a, b = make(seed=42), make(seed=42)
    assert same_buffers(a, snapshot(b))
    assert torch.equal(a(q, k, v), b(q, k, v))
    c = make(seed=43)
    assert changed_all(c, snapshot(a))


def test_no_seed_draws_differ():
    torch.manual_seed(0)
    a = make(seed=None)
    b = make(seed=None)
    assert not torch.equal(a.feature_matrix, b.feature_matrix)


# ------------------------------------------------------------------------------------------------
# Redraw policy.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [None, 0])
def test_no_redraw_interval_never_redraws(interval):
    m = make(redraw_interval=interval).train()
    snap = snapshot(m)
    q, k, v = qkv(n=8)
    for _ in range(10):
        m(q, k, v)
    assert same_buffers(m, snap)
    assert int(m.draws) == 0


def test_redraw_interval_three():
    m = make(seed=3, redraw_interval=3).train()
    q, k, v = qkv(n=8)
    history = [snapshot(m)]
    for _ in range(8):  # steps 0..7
        m(q, k, v)
        history.append(snapshot(m))
    # history[i + 1] holds the buffers used by (and left after) forward step i.
    changed = [i for i in range(8) if not same_buffers_snap(history[i], history[i + 1])]
    assert changed == [3, 6]
    # Each redraw replaces both matrices.
    for i in changed:
        for name in RANDOM:
            assert not torch.equal(history[i][name], history[i + 1][name])
    assert int(m.draws) == 2
    assert int(m.steps) == 8


def test_redraw_interval_affects_output_at_step():
    # The redraw happens *before* the forward of step 3: its output already uses the new draw.
    m = make(seed=3, redraw_interval=3, num_features=16, bucket_size=4).train()
    q, k, v = qkv(n=32)
    outs = [m(q, k, v) for _ in range(4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[2], outs[3])
    ref = scatterbrain_attention(
        q, k, v, num_features=16, bucket_size=4, feature_matrix=m.feature_matrix, hash_projections=m.hash_projections
    )
    assert torch.equal(outs[3], ref)


def test_redraw_interval_not_in_eval_mode():
    m = make(redraw_interval=3).eval()
    snap = snapshot(m)
    q, k, v = qkv(n=8)
    for _ in range(10):
        m(q, k, v)
    assert same_buffers(m, snap)
    assert int(m.steps) == 0 and int(m.draws) == 0
    # Eval forwards do not count towards the interval: back in training, step 3 is the 4th training forward.
    m.train()
    for i in range(4):
        m(q, k, v)
        assert same_buffers(m, snap) == (i < 3)


def test_redraw_on_request_and_sequence_reproducible():
    a, b = make(seed=9), make(seed=9)
    seen = [snapshot(a)]
    for _ in range(3):
        a.redraw()
        assert changed_all(a, seen[-1])
        seen.append(snapshot(a))
    for _ in range(3):
        b.redraw()
    assert same_buffers(b, seen[-1])
    assert int(a.draws) == int(b.draws) == 3
    # All draws of the sequence are distinct, and a third module at draw 1 matches draw 1.
    for i in range(len(seen)):
        for j in range(i):
            assert not torch.equal(seen[i]["feature_matrix"], seen[j]["feature_matrix"])
    c = make(seed=9)
    c.redraw()
    assert same_buffers(c, seen[1])
    # A different seed gives a different sequence.
    d = make(seed=10)
    d.redraw()
    assert changed_all(d, seen[1])


def test_redraw_keeps_float32_after_cast():
    m = make().to(torch.bfloat16)
    m.redraw()
    for name in RANDOM:
        assert getattr(m, name).dtype == torch.float32


def same_buffers_snap(a, b):
    return all(torch.equal(a[name], b[name]) for name in RANDOM)


def test_failed_forward_does_not_advance_redraw_schedule():
    m = make(redraw_interval=1).train()
    q, k, v = qkv(n=8)
    k_bad = qkv(b=3, n=8)[1]
    m(q, k, v)  # step 0 (a real one)
    snap = snapshot(m)
    for _ in range(3):
        with pytest.raises(ValueError, match=r"batch sizes differ"):
            m(q, k_bad, k_bad)
    assert int(m.steps) == 1
    assert int(m.draws) == 0
    assert same_buffers(m, snap)


# ------------------------------------------------------------------------------------------------
# Casting.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: m.to("cpu", torch.float16),
        lambda m: m.bfloat16(),
    ],
    ids=["to-bf16", "half", "double", "float", "to-cpu-fp16", "bfloat16"],
)
def test_cast_keeps_random_matrices_float32(cast):
    m = make(n_hashes=2)
    snap = snapshot(m)
    counters = (m.seed.clone(), m.draws.clone(), m.steps.clone())
    out = cast(m)
    assert out is m
    for name in RANDOM:
        assert getattr(m, name).dtype == torch.float32
        assert torch.equal(getattr(m, name), snap[name])
        assert m.state_dict()[name].dtype == torch.float32
    # Integer counters stay integers and keep their values.
    assert m.seed.dtype == m.draws.dtype == m.steps.dtype == torch.int64
    assert (m.seed, m.draws, m.steps) == counters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_module_runs_on_half_inputs(dtype):
    q, k, v = qkv(dtype=dtype)
    m = make().to(dtype)
    out = m(q, k, v)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # Buffers kept float32 means the cast module equals the uncast one on the same inputs.
    assert torch.equal(out, make()(q, k, v))


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


def test_forward_head_dim_mismatch():
    m = make()
    q, k, v = qkv(d=D + 4)
    with pytest.raises(ValueError, match=r"query head_dim 12 does not match this module's head_dim 8"):
        m(q, k, v)


def test_forward_validates_like_functional():
    m = make()
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"head-dim mismatch: query head_dim 8, key head_dim 7"):
        m(q, k[..., :7], v)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor"):
        m(q, k, v, key_padding_mask=torch.zeros(2, 32))


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(head_dim=0), ValueError, r"head_dim must be a positive int, got 0"),
        (dict(head_dim=-2), ValueError, r"head_dim must be a positive int, got -2"),
        (dict(head_dim=8.0), ValueError, r"head_dim must be a positive int, got 8.0"),
        (dict(head_dim=True), ValueError, r"head_dim must be a positive int, got True"),
        (dict(redraw_interval=-1), ValueError, r"redraw_interval must be None or an int >= 0, got -1"),
        (dict(redraw_interval=1.5), ValueError, r"redraw_interval must be None or an int >= 0, got 1.5"),
        (dict(backend="foo"), ValueError, r"backend must be one of \('auto', 'reference', 'triton'\), got 'foo'"),
        (dict(num_features=-1), ValueError, r"num_features must be >= 0, got -1"),
        (dict(bucket_size=0), ValueError, r"bucket_size must be >= 1, got 0"),
        (dict(sparse="dense"), ValueError, r"sparse must be one of"),
        (dict(feature_type="relu"), ValueError, r"feature_type must be one of"),
        (dict(num_features=0, sparse="none"), ValueError, r"num_features=0 with sparse='none'"),
    ],
)
def test_bad_constructor_args(kwargs, exc, pattern):
    settings = dict(head_dim=D, num_features=16)
    settings.update(kwargs)
    head_dim = settings.pop("head_dim")
    with pytest.raises(exc, match=pattern):
        ScatterbrainAttention(head_dim, **settings)


# ------------------------------------------------------------------------------------------------
# Gradients and equivalence with the functional API.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", ["lsh", "local", "none"])
def test_gradients_reach_qkv_not_buffers(sparse):
    m = make(sparse=sparse, window=6)
    q, k, v = qkv(hkv=1, requires_grad=True)
    out = m(q, k, v)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0
    for name, buf in m.named_buffers():
        assert buf.grad is None, name
        assert not buf.requires_grad, name


def test_gradients_match_functional():
    m = make(seed=4)
    q, k, v = qkv(requires_grad=True)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=q.dtype)
    (m(q, k, v) * weights).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = scatterbrain_attention(
        q2, k2, v2, num_features=16, bucket_size=4, feature_matrix=m.feature_matrix, hash_projections=m.hash_projections
    )
    (out * weights).sum().backward()
    for g, t in zip(grads, (q2, k2, v2)):
        assert torch.equal(g, t.grad)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(feature_type="hyperbolic", n_hashes=2),
        dict(sparse="local", window=6),
        dict(sparse="none"),
        dict(num_features=0),
        dict(num_features=0, sparse="local", window=4),
    ],
    ids=["lsh", "hyperbolic-2rounds", "local", "performer", "lsh-only", "local-only"],
)
@pytest.mark.parametrize("causal", [False, True])
def test_module_equals_functional(settings, causal):
    kw = dict(num_features=16, bucket_size=4)
    kw.update(settings)
    m = ScatterbrainAttention(D, seed=12, **kw)
    q, k, v = qkv(h=4, hkv=2)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[1, 20:] = True
    got = m(q, k, v, is_causal=causal, key_padding_mask=mask, scale=0.3)
    want = scatterbrain_attention(
        q,
        k,
        v,
        is_causal=causal,
        key_padding_mask=mask,
        scale=0.3,
        feature_matrix=m.feature_matrix,
        hash_projections=m.hash_projections,
        **kw,
    )
    assert torch.equal(got, want)


def test_module_matches_functional_seed():
    # The module's draw 0 comes from the same generator sequence as the functional seed path
    # (features first, then projections), seeded with the module seed.
    m = make(seed=21, n_hashes=2)
    q, k, v = qkv()
    want = scatterbrain_attention(q, k, v, num_features=16, bucket_size=4, n_hashes=2, seed=21)
    assert torch.equal(m(q, k, v), want)


# ------------------------------------------------------------------------------------------------
# Feature matrix distribution.
# ------------------------------------------------------------------------------------------------


def test_feature_rows_orthogonal_within_blocks_and_chi_norms():
    head_dim = 16
    m = ScatterbrainAttention(head_dim, num_features=1024, sparse="none", seed=0)
    w = m.feature_matrix.double()
    assert w.shape == (1024, head_dim)
    norms = w.norm(dim=-1)
    for start in range(0, 1024, head_dim):
        blk = w[start : start + head_dim]
        gram = blk @ blk.t()
        rel = gram / (norms[start : start + head_dim, None] * norms[None, start : start + head_dim])
        off = rel - torch.diag(torch.diagonal(rel))
        assert off.abs().max() < 1e-5
    # Across blocks the directions are independent: not orthogonal in general.
    cross = (w[:head_dim] @ w[head_dim : 2 * head_dim].t()) / (norms[:head_dim, None] * norms[None, head_dim : 2 * head_dim])
    assert cross.abs().max() > 1e-2
    # Row norms are chi(head_dim): E|w|^2 = head_dim, and they are not all equal.
    mean_sq = (norms**2).mean().item()
    assert abs(mean_sq - head_dim) < 0.1 * head_dim
    assert norms.std().item() > 0.1


def test_feature_matrix_partial_last_block():
    # num_features not a multiple of head_dim: the last, partial block is still orthogonal.
    m = ScatterbrainAttention(D, num_features=20, sparse="none", seed=1)
    w = m.feature_matrix.double()
    assert w.shape == (20, D)
    last = w[16:]
    n = last.norm(dim=-1)
    rel = (last @ last.t()) / (n[:, None] * n[None, :])
    assert (rel - torch.eye(4, dtype=rel.dtype)).abs().max() < 1e-5


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_keeps_the_forwards_features(reentrant):
    """Checkpointing re-runs the forward during backward: that recomputation is not a step (the
    schedule moves once per step) and uses the features the forward used, so steps, draws and
    gradients equal those without checkpointing, with a redraw at every step."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = qkv(b=1, n=24)
    results = []
    for checkpointed in (False, True):
        m = make(seed=1, sparse="none", redraw_interval=1).train()
        per_step = []
        for _ in range(3):
            qq = q.clone().requires_grad_()
            out = checkpoint(m, qq, k, v, use_reentrant=reentrant) if checkpointed else m(qq, k, v)
            out.square().sum().backward()
            per_step.append((int(m.steps), int(m.draws), qq.grad))
        results.append(per_step)
    for (steps, draws, grad), (steps_c, draws_c, grad_c) in zip(*results):
        assert (steps, draws) == (steps_c, draws_c)
        assert torch.allclose(grad, grad_c, rtol=1e-12, atol=0)
    assert [s for s, _, _ in results[1]] == [1, 2, 3] and [d for _, d, _ in results[1]] == [0, 1, 2]


def test_redraw_between_forward_and_backward_keeps_the_used_features():
    """One module called twice in a step whose second call redraws: the first call's backward
    still sees the matrices it used (training calls with a redraw schedule use copies of the
    buffers), so the gradient is that of the two forwards as they ran. (float32 inputs: autograd
    would otherwise save the float32 buffer itself, not a cast copy.) The redraw writes into the
    buffers in place (same storage), which captured CUDA graphs rely on."""
    q, k, v = qkv(b=1, n=24, dtype=torch.float32)
    m = make(seed=2, sparse="none", redraw_interval=1).train()
    first_w = m.feature_matrix.clone()
    storage = m.feature_matrix.data_ptr(), m.hash_projections.data_ptr()
    qq = q.clone().requires_grad_()
    out = m(qq, k, v) + m(qq, k, v)  # steps 0 and 1: the second redraws first
    assert (m.feature_matrix.data_ptr(), m.hash_projections.data_ptr()) == storage
    second_w = m.feature_matrix.clone()
    assert not torch.equal(first_w, second_w)
    out.square().sum().backward()
    q_ref = q.clone().requires_grad_()
    kw = dict(num_features=16, sparse="none", backend="reference")
    expected = (scatterbrain_attention(q_ref, k, v, feature_matrix=first_w, **kw)
                + scatterbrain_attention(q_ref, k, v, feature_matrix=second_w, **kw))
    expected.square().sum().backward()
    assert torch.allclose(qq.grad, q_ref.grad, rtol=1e-6, atol=1e-7)


def test_redraw_schedule_does_not_recompile_under_torch_compile():
    """Under torch.compile the schedule runs eagerly (a graph break in training mode with a
    redraw_interval): ten training steps compile a fixed number of graphs instead of one per
    step, and give the eager module's outputs (redraws included); in eval mode the module is
    still one graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    q, k, v = qkv(b=1, n=24)
    eager, compiled_module = make(seed=3, redraw_interval=2).train(), make(seed=3, redraw_interval=2).train()
    counter = CompileCounter()
    compiled = torch.compile(compiled_module, backend=counter)
    frames = []
    for _ in range(10):
        assert torch.allclose(compiled(q, k, v), eager(q, k, v), rtol=1e-12, atol=0)
        frames.append(counter.frame_count)
    assert frames[2] == frames[-1], frames
    assert int(compiled_module.draws) == int(eager.draws) == 4
    torch._dynamo.reset()
    evaluated = torch.compile(make(seed=3, redraw_interval=2).eval(), backend="eager", fullgraph=True)
    assert torch.allclose(evaluated(q, k, v), make(seed=3).eval()(q, k, v), rtol=1e-12, atol=0)


def test_built_under_the_meta_device_then_to_empty():
    """Deferred initialisation: built under torch.device("meta") (as FSDP-style and large-model
    loaders do), the module's small random buffers and counters are made with their values, and
    `to_empty` keeps them: the same module as one built directly. A module moved to meta and back
    with to_empty has no values to keep (as any module) but does not fail."""
    with torch.device("meta"):
        deferred = make(seed=4, redraw_interval=3)
    deferred = deferred.to_empty(device="cpu")
    direct = make(seed=4, redraw_interval=3)
    for name in ("seed", "draws", "steps", *RANDOM):
        assert torch.equal(getattr(deferred, name), getattr(direct, name)), name
    q, k, v = qkv()
    assert torch.equal(deferred(q, k, v), direct(q, k, v))
    make(seed=5).to("meta").to_empty(device="cpu")


@pytest.mark.parametrize("sparse", ["lsh", "local", "none"])
def test_module_ensembles_under_vmap(sparse):
    """torch.func.stack_module_state + functional_call + vmap over modules with different seeds (an
    ensemble) equals calling each module (before: an in-place write into an unbatched tensor failed)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    q, k, v = qkv(n=24, dtype=torch.float32)
    modules = [make(seed=s, sparse=sparse, window=8, bucket_size=8, num_features=8).eval() for s in range(3)]
    params, buffers = stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")
    out = vmap(lambda p, b: functional_call(base, (p, b), (q, k, v)), in_dims=(0, 0))(params, buffers)
    torch.testing.assert_close(out, torch.stack([m(q, k, v) for m in modules]), atol=1e-6, rtol=0)
