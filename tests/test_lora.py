"""Chained low-rank attention gradients (exact forward, approximate backward) and LoRA.

Tolerances: float64 identities 1e-10; statistical statements are averaged over seeds."""

import pytest
import torch

import scatterattn as sa
from scatterattn import lora

F64 = torch.float64


def qkv(batch=2, heads=4, kv_heads=2, n=70, s=None, dim=8, v_dim=None, gamma=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = s or n
    q = torch.randn(batch, heads, n, dim, generator=gen, dtype=F64) * gamma
    k = torch.randn(batch, kv_heads, s, dim, generator=gen, dtype=F64) * gamma
    v = torch.randn(batch, kv_heads, s, v_dim or dim, generator=gen, dtype=F64)
    do = torch.randn(batch, heads, n, v_dim or dim, generator=gen, dtype=F64)
    return q, k, v, do


def grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def rel(a, b):
    return float((a - b).norm() / b.norm())


MASKS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="causal"),
    pytest.param(False, True, id="padding"),
    pytest.param(True, True, id="causal+padding"),
]


@pytest.mark.parametrize("is_causal,padded", MASKS)
def test_exact_factors_reproduce_autograd(is_causal, padded):
    """With U1 = P, V1 = I the chain is the exact backward (GQA, Dv != D, N not a chunk multiple)."""
    q, k, v, do = qkv(n=150, v_dim=5)
    kpm = None
    if padded:
        kpm = torch.zeros(2, 150, dtype=torch.bool)
        kpm[0, -20:] = True
    exact = grads(lambda q, k, v: sa.dense_attention(q, k, v, is_causal=is_causal, key_padding_mask=kpm), q, k, v, do)
    chain = grads(
        lambda q, k, v: lora.chained_lowrank_attention(
            q, k, v, is_causal=is_causal, key_padding_mask=kpm, factors="exact", threshold=None, seed=0
        ),
        q, k, v, do,
    )
    for a, b in zip(chain, exact):
        assert (a - b).abs().max() < 1e-10


def lora_attention_grads(adapt, attention):
    """Gradients of every LoRA factor through `attention`, X -> Q, K, V with adapters, float64."""
    gen = torch.Generator().manual_seed(3)
    d_model, heads, dim, rank, alpha, n = 16, 2, 8, 4, 8.0, 40
    x = torch.randn(2, n, d_model, generator=gen, dtype=F64)
    base = {p: torch.randn(d_model, heads * dim, generator=gen, dtype=F64) / 4 for p in "qkv"}
    factors = {
        p: (torch.randn(d_model, rank, generator=gen, dtype=F64) / 4, torch.randn(rank, heads * dim, generator=gen, dtype=F64) / 4)
        for p in adapt
    }
    leaves = [t.requires_grad_() for pair in factors.values() for t in pair]
    proj = {}
    for p in "qkv":
        w = base[p]
        if p in factors:
            a, b = factors[p]
            w = w + (alpha / rank) * a @ b
        proj[p] = (x @ w).reshape(2, n, heads, dim).transpose(1, 2)
    target = torch.randn(2, heads, n, dim, generator=gen, dtype=F64)
    loss = ((attention(proj["q"], proj["k"], proj["v"]) - target) ** 2).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("adapt", ["qv", "qkv"], ids=["partial", "full"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_every_lora_gradient_matches_autograd_with_exact_factors(adapt, is_causal):
    exact = lora_attention_grads(adapt, lambda q, k, v: sa.dense_attention(q, k, v, is_causal=is_causal))
    chain = lora_attention_grads(
        adapt,
        lambda q, k, v: lora.chained_lowrank_attention(q, k, v, is_causal=is_causal, factors="exact", threshold=None),
    )
    assert len(exact) == 2 * len(adapt)
    for a, b in zip(chain, exact):
        assert (a - b).abs().max() < 1e-10
        assert b.abs().max() > 1e-3  # a real gradient, not zeros


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradient_error_falls_as_features_grow(is_causal):
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=2, n=128, dim=16, gamma=0.3)
    assert float(lora.logit_bound(q, k, 0.25).max()) < lora.DEFAULT_THRESHOLD
    exact = grads(lambda q, k, v: sa.dense_attention(q, k, v, is_causal=is_causal), q, k, v, do)
    errors, cosines = [], []
    for m in (8, 64, 512):
        err, cos = 0.0, 0.0
        for seed in range(4):
            approx = grads(
                lambda q, k, v: lora.chained_lowrank_attention(q, k, v, num_features=m, seed=seed, is_causal=is_causal),
                q, k, v, do,
            )
            assert (approx[0] - exact[0]).abs().max() < 1e-12  # the forward is exact
            err += sum(rel(a, b) for a, b in zip(approx[1:], exact[1:])) / 12
            cos += sum(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
                       for a, b in zip(approx[1:], exact[1:])) / 12
        errors.append(err)
        cosines.append(cos)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 3, errors
    assert errors[2] < 0.1 and cosines[2] > 0.99, (errors, cosines)


def test_fallback_triggers_above_threshold_only():
    q, k, v, do = qkv(batch=2, heads=4, kv_heads=2, n=64, dim=8, gamma=0.3)
    q = q.clone()
    q[1, 2:] *= 20  # batch 1, kv head 1 (query heads 2, 3): large logits
    bounds = lora.logit_bound(q, k, 8**-0.5)
    assert bounds[1, 1] > 3.0 and (bounds.flatten()[:3] < 3.0).all()
    stats = lora.ChainedGradientStats()
    approx = grads(lambda q, k, v: lora.chained_lowrank_attention(q, k, v, threshold=3.0, stats=stats, seed=0), q, k, v, do)
    exact = grads(lambda q, k, v: sa.dense_attention(q, k, v), q, k, v, do)
    assert (stats.approximate, stats.fallback) == (3, 1)
    assert stats.max_logit_bound == pytest.approx(float(bounds.max()))
    # the fallback group is exact, the others are approximate (close but not equal)
    assert (approx[1][1, 2:] - exact[1][1, 2:]).abs().max() < 1e-10
    assert (approx[2][1, 1] - exact[2][1, 1]).abs().max() < 1e-10
    assert (approx[3][1, 1] - exact[3][1, 1]).abs().max() < 1e-10
    assert (approx[1][0] - exact[1][0]).abs().max() > 1e-6
    # below every bound nothing falls back; threshold=None never falls back
    stats.reset()
    grads(lambda q, k, v: lora.chained_lowrank_attention(q, k, v, threshold=1e6, stats=stats, seed=0), q, k, v, do)
    grads(lambda q, k, v: lora.chained_lowrank_attention(q, k, v, threshold=None, stats=stats, seed=0), q, k, v, do)
    assert (stats.approximate, stats.fallback) == (8, 0)


def test_rows_of_the_approximate_ds_sum_to_zero():
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=1, n=50, dim=8, gamma=0.5)
    w = sa.features.draw_feature_matrix(32, 8, generator=torch.Generator().manual_seed(0)).double()
    qg = q.reshape(1, 1, 2, 50, 8)
    for is_causal in (False, True):
        u1, v1, underflow = lora.random_feature_factors(qg, k, w, 8**-0.5, is_causal=is_causal)
        assert not underflow.any()
        f = u1 @ v1.unsqueeze(2).transpose(-1, -2)
        if is_causal:
            f = f.tril()
        assert (f.sum(-1) - 1).abs().max() < 1e-12  # the factorised matrix is row-stochastic
        dog = do.reshape(1, 1, 2, 50, 8)
        o_tilde = f @ v.unsqueeze(2)
        ds = f * (dog @ v.unsqueeze(2).transpose(-1, -2)) - (dog * o_tilde).sum(-1, keepdim=True) * f
        assert ds.sum(-1).abs().max() < 1e-12
        # and the chain's dq equals tau * dS K computed densely
        dq, _, _ = lora.chained_attention_backward(qg, k, v, dog, u1, v1, 8**-0.5, is_causal=is_causal)
        assert (dq - 8**-0.5 * ds @ k.unsqueeze(2)).abs().max() < 1e-10


def test_bad_configuration_raises():
    q, k, v, _ = qkv(batch=1, heads=1, kv_heads=1, n=8)
    with pytest.raises(ValueError, match="num_features must be an int >= 1"):
        lora.chained_lowrank_attention(q, k, v, num_features=0)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        lora.chained_lowrank_attention(q, k, v, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        lora.ChainedLowRankAttention(8, threshold=float("nan"))
    with pytest.raises(ValueError, match="sparse_threshold must be a finite number >= 0"):
        lora.chained_lowrank_attention(q, k, v, sparse="lsh", sparse_threshold=float("inf"))
    with pytest.raises(ValueError, match=r"sparse_threshold \(1.0\) must be >= threshold \(2.0\)"):
        lora.chained_lowrank_attention(q, k, v, threshold=2.0, sparse="local", sparse_threshold=1.0)
    with pytest.raises(ValueError, match="sparse_threshold needs a sparse support"):
        lora.chained_lowrank_attention(q, k, v, sparse_threshold=5.0)
    with pytest.raises(ValueError, match="sparse must be one of"):
        lora.chained_lowrank_attention(q, k, v, sparse="bucket")
    with pytest.raises(ValueError, match="bucket_size must be >= 1"):
        lora.ChainedLowRankAttention(8, sparse="lsh", bucket_size=0)
    with pytest.raises(ValueError, match="takes no sparse correction"):
        lora.chained_lowrank_attention(q, k, v, sparse="lsh", factors="exact")
    with pytest.raises(ValueError, match=r"hash_projections must have shape \(2, 10\)"):
        lora.chained_lowrank_attention(q, k, v, sparse="lsh", n_hashes=2, hash_projections=torch.randn(1, 10))
    with pytest.raises(ValueError, match="factors must be"):
        lora.chained_lowrank_attention(q, k, v, factors="dense")
    with pytest.raises(ValueError, match=r"feature_matrix must have shape \(16, 8\)"):
        lora.chained_lowrank_attention(q, k, v, num_features=16, feature_matrix=torch.randn(16, 9))
    with pytest.raises(ValueError, match="head_dim"):
        lora.ChainedLowRankAttention(16)(q, k, v)
    with pytest.raises(ValueError, match="mode must be 'partial' or 'full'"):
        lora.attention_lora_targets(torch.nn.Linear(2, 2), mode="half")
    with pytest.raises(ValueError, match="no separate query/key/value"):
        lora.attention_lora_targets(torch.nn.Sequential(torch.nn.Linear(4, 12)))
    # settings that would be silently unused, or fail late (at backward, or after the schedule moved)
    with pytest.raises(ValueError, match=r"sparse='local' with threshold=None: every group would take the plain"):
        lora.chained_lowrank_attention(q, k, v, sparse="local", threshold=None)
    with pytest.raises(ValueError, match="sparse_threshold needs a sparse support"):
        lora.ChainedLowRankAttention(8, sparse_threshold=3.0)
    with pytest.raises(ValueError, match=r"sparse_threshold \(1.0\) must be >= threshold \(2.0\)"):
        lora.ChainedLowRankAttention(8, threshold=2.0, sparse="lsh", sparse_threshold=1.0)
    with pytest.raises(TypeError, match="stats must be a ChainedGradientStats or None, got str"):
        lora.chained_lowrank_attention(q, k, v, stats="x")
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        lora.chained_lowrank_attention(q.tolist(), k, v)


class TinyAttentionBlock(torch.nn.Module):
    def __init__(self, d_model=32, heads=4, attention=None):
        super().__init__()
        self.heads = heads
        self.q_proj = torch.nn.Linear(d_model, d_model)
        self.k_proj = torch.nn.Linear(d_model, d_model)
        self.v_proj = torch.nn.Linear(d_model, d_model)
        self.o_proj = torch.nn.Linear(d_model, d_model)
        self.attention = attention

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = self.attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


def _train_lora(mode, attention, steps=40):
    peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")
    torch.manual_seed(0)
    teacher = TinyAttentionBlock(attention=sa.dense_attention)
    model = TinyAttentionBlock(attention=attention)
    model.load_state_dict(teacher.state_dict(), strict=False)  # the student's attention has buffers
    with torch.no_grad():  # the student differs from the teacher in the query and value projections
        model.q_proj.weight.add_(0.3 * torch.randn_like(model.q_proj.weight))
        model.v_proj.weight.add_(0.3 * torch.randn_like(model.v_proj.weight))
    targets = lora.attention_lora_targets(model, mode)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="gaussian"))
    x = 0.3 * torch.randn(16, 24, 32)  # small activations: logit bound below the default threshold
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, targets, losses


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_peft_adapted_model_trains_through_the_chained_backward(mode):
    attn = lora.ChainedLowRankAttention(8, num_features=64, seed=0)
    model, targets, losses = _train_lora(mode, attn)
    assert sorted(targets) == (["q_proj", "v_proj"] if mode == "partial" else ["k_proj", "q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # one record per (batch, head) and step; training may push a few groups over the threshold
    assert attn.stats.approximate + attn.stats.fallback == 16 * 4 * 40
    assert attn.stats.history[0] == (64, 0)  # the first step is entirely chained
    assert attn.stats.fallback_fraction < 0.25, attn.stats
    _, _, exact_losses = _train_lora(mode, sa.dense_attention)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < 1.5 * exact_losses[-1], (losses[-1], exact_losses[-1])


def kernel_and_einsum_grads(q, k, v, do, **kw):
    """(dq, dk, dv) of the chained backward with the Triton Kronecker kernels and with the einsums
    (m 16, seed 0, no threshold)."""
    results = {}
    for backend in ("triton", "reference"):
        results[backend] = grads(
            lambda q, k, v: lora.chained_lowrank_attention(q, k, v, num_features=16, seed=0, threshold=None,
                                                           backend=backend, **kw),
            q, k, v, do,
        )[1:]
    return results["triton"], results["reference"]


@pytest.mark.parametrize("is_causal", [False, True])
def test_kronecker_kernels_match_the_torch_chain(is_causal):
    """The Triton Kronecker-product kernels (interpreter on CPU) against the einsum chain, fp32."""
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=1, n=70, dim=16, v_dim=8, gamma=0.4)
    q, k, v, do = (t.float() for t in (q, k, v, do))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (t.to(device) for t in (q, k, v, do))
    for a, b in zip(*kernel_and_einsum_grads(q, k, v, do, is_causal=is_causal)):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("op_dtype,tol", [(torch.float32, 1e-6), (torch.float16, 4e-3), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "fp16-operands", "bf16-operands"])
@pytest.mark.parametrize("blocks", [{}, {"block_n": 16, "block_m": 16, "num_warps": 2}], ids=["default", "small-blocks"])
def test_kernel_products_directly(op_dtype, tol, blocks):
    """kron_gram / kron_rows against the einsums: N = 37 (not a block multiple), m = 24 (two feature
    blocks of 16 with small blocks), E = 5, D = 20, a middle factor broadcast over a group of 3
    slices (GQA; not copied) and one broadcast over the batch (copied); 16-bit operands (bf16 on GPUs)
    within their rounding (unit roundoff fp16 4.9e-4, bf16 3.9e-3)."""
    from scatterattn.kernels import chained_grad

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    a, b, c = torch.rand(2, 37, 24, generator=gen), torch.randn(2, 37, 5, generator=gen), torch.randn(2, 37, 20, generator=gen)
    a, b, c = (x.to(device) for x in (a, b, c))
    gram = chained_grad.kron_gram(a, b, c, op_dtype=op_dtype, **blocks)
    assert gram.dtype == torch.float32
    assert rel(gram, lora._kron_gram(a.double(), b.double(), c.double()).float()) < tol
    if blocks:  # rows split over 3 programs per slice (16 + 16 + 5 rows), summed by the launcher
        split = chained_grad.kron_gram(a, b, c, op_dtype=op_dtype, splits=3, **blocks)
        assert rel(split, gram) < 1e-6
    rows = chained_grad.kron_rows(a, b, gram, op_dtype=op_dtype, **blocks)
    assert rel(rows, lora._kron_rows(a.double(), b.double(), gram.double()).float()) < tol
    a3, b3 = (x.unsqueeze(1).expand(-1, 3, -1, -1) * torch.rand(1, 3, 1, 1, device=device) for x in (a, b))
    for middle in (gram.unsqueeze(1), gram[:1].unsqueeze(1).expand(1, 3, -1, -1, -1)):
        got = chained_grad.kron_rows(a3, b3, middle, op_dtype=op_dtype, **blocks)
        assert rel(got, lora._kron_rows(a3.double(), b3.double(), middle.double()).float()) < tol


def test_kernel_launchers_refuse_bad_arguments():
    from scatterattn import triton_backend
    from scatterattn.kernels import chained_grad

    assert triton_backend.CHAINED_MAX_HEAD_DIM == chained_grad.MAX_DIM

    a, b = torch.rand(1, 8, 4), torch.randn(1, 8, 300)
    with pytest.raises(ValueError, match="b.shape\\[-1\\] must be <= 256"):
        chained_grad.kron_gram(a, b, torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="middle.shape\\[-1\\] must be <= 256"):
        chained_grad.kron_rows(a, torch.randn(1, 8, 4), torch.zeros(1, 4, 4, 300))
    with pytest.raises(ValueError, match="share their leading dims"):
        chained_grad.kron_gram(a, torch.randn(1, 9, 4), torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="middle end in"):
        chained_grad.kron_rows(a, torch.randn(1, 8, 4), torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="splits must be"):
        chained_grad.kron_gram(a, torch.randn(1, 8, 4), torch.randn(1, 8, 4), splits=0)


def test_exact_factors_keep_fp32_kernel_operands(monkeypatch):
    """factors='exact' (the algebra check) must not round kernel operands to bf16, whatever the
    operand policy says for the inputs."""
    from scatterattn.kernels import chained_grad

    monkeypatch.setattr(chained_grad, "operand_dtype", lambda dtype, device="cuda": torch.bfloat16)
    seen = []
    kron_gram = chained_grad.kron_gram
    monkeypatch.setattr(chained_grad, "kron_gram", lambda *a, op_dtype, **kw: seen.append(op_dtype) or kron_gram(
        *a, op_dtype=torch.float32, **kw))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: the interpreter)
    q = torch.randn(1, 1, 20, 16, device=device, requires_grad=True)
    lora.chained_lowrank_attention(q, q, q, factors="exact", threshold=None, backend="triton").sum().backward()
    lora.chained_lowrank_attention(q, q, q, threshold=None, backend="triton", seed=0).sum().backward()
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2  # two grams per backward


@pytest.mark.parametrize("op_dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)], ids=["fp16", "bf16"])
def test_chain_with_16_bit_kernel_operands(op_dtype, tol):
    """chained_attention_backward with 16-bit kernel operands: factors cast once, results back in the
    compute dtype, within the operands' rounding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: the interpreter)
    q, k, v, do = (t.float().to(device) for t in qkv(batch=1, heads=2, kv_heads=1, n=70, dim=16, gamma=0.4))
    qg, dog = (x.reshape(1, 1, 2, 70, -1) for x in (q, do))
    u1, v1, _ = lora.random_feature_factors(qg, k, torch.randn(16, 16, device=device), 0.25)
    einsum = lora.chained_attention_backward(qg, k, v, dog, u1, v1, 0.25)
    kernels = lora.chained_attention_backward(qg, k, v, dog, u1, v1, 0.25, kernel_dtype=op_dtype)
    for a, b in zip(kernels, einsum):
        assert a.dtype == torch.float32
        assert rel(a, b) < tol


def test_kernel_operand_dtype_policy():
    """16-bit inputs on CUDA get bf16 tensor-core operands (fp16 would flush D~^-1 phi(q) to zero);
    fp32 stays fp32. The CPU interpreter follows the GPU where its bf16 dots and casts are right (with
    tests/conftest.py's fix; test_kernels.py checks the fp32 operands without it)."""
    from scatterattn.kernels import chained_grad
    from scatterattn.kernels.interpreter import bf16_kernels_work

    assert chained_grad.operand_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert chained_grad.operand_dtype(torch.float16, "cuda") == torch.bfloat16
    assert chained_grad.operand_dtype(torch.float32, "cuda") == torch.float32
    assert chained_grad.operand_dtype(torch.float32, "cpu") == torch.float32
    want = torch.bfloat16 if bf16_kernels_work() else torch.float32
    assert chained_grad.operand_dtype(torch.float16, "cpu") == want


def test_no_cpu_kernel_probe_without_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET (a GPU machine) no kernel runs on CPU tensors: the bf16 probes are
    not launched (compiled for the GPU they would fail on CPU pointers) and CPU operands are fp32."""
    from scatterattn.kernels import chained_grad, interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(interpreter, "bf16_dot_works", lambda: pytest.fail("probe launched"))
    assert not interpreter.bf16_kernels_work()
    assert chained_grad.operand_dtype(torch.float16, "cpu") == torch.float32


def test_kronecker_kernels_wide_heads():
    """Head dim 160 (over the Scatterbrain kernels' 128, within the chained kernels' 256; no power
    of two), Dv 130: the Triton chain against the einsum chain, fp32."""
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=1, n=40, dim=160, v_dim=130, gamma=0.1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (t.float().to(device) for t in (q, k, v, do))
    for a, b in zip(*kernel_and_einsum_grads(q, k, v, do)):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kronecker_kernels_with_half_inputs(dtype):
    """backend='triton' with 16-bit inputs (bf16 kernel operands, on a GPU and in the interpreter with
    tests/conftest.py's fix) against the einsum chain on the same inputs: bf16 rounding only."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (t.to(device, dtype) for t in qkv(batch=1, heads=2, kv_heads=1, n=70, dim=16, gamma=0.4))
    for a, b in zip(*kernel_and_einsum_grads(q, k, v, do)):
        assert torch.isfinite(a).all()
        assert rel(a.float(), b.float()) < 2e-2


def test_causal_chain_does_not_depend_on_the_chunk():
    """The causal chain's chunking (64 rows, doubled beyond 128 chunks) changes cost, not results:
    chunks of 16, 48 (N = 150 is no multiple of either) and 256 (one chunk) agree to 1e-12."""
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=1, n=150, dim=8, v_dim=5, gamma=0.5)
    qg, dog = (x.reshape(1, 1, 2, 150, -1) for x in (q, do))
    u1, v1, _ = lora.random_feature_factors(qg, k, torch.randn(16, 8, dtype=F64), 8**-0.5, is_causal=True)
    results = [lora._chain_causal(qg, k, v, dog, u1, v1, 8**-0.5, gram=lora._kron_gram, rows=lora._kron_rows,
                                  chunk=chunk) for chunk in (16, 48, 256)]
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert rel(a, b) < 1e-12
    assert [lora.causal_chunk(n) for n in (1, 8192, 8193, 65536)] == [64, 64, 128, 512]


def test_factor_underflow_falls_back_instead_of_nan():
    """Causal rows whose visible keys carry negligible feature mass next to later keys make D~
    underflow in float32; those groups must be computed exactly (counted), never give inf/NaN."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 16, generator=gen) * 2
    k = torch.randn(1, 2, 64, 16, generator=gen) * 2
    k[:, :, :8] *= 8  # long early keys: their features exp(w.k - |k|^2/2) vanish next to later keys
    v = torch.randn(1, 2, 64, 16, generator=gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    stats = lora.ChainedGradientStats()
    out = lora.chained_lowrank_attention(q, k, v, is_causal=True, threshold=None, stats=stats, seed=0, num_features=32)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert stats.numeric > 0 and stats.fallback == stats.numeric


# ----------------------------------------------------------------------------- sparse-corrected chain

SUPPORTS = [
    pytest.param("lsh", {"bucket_size": 64, "n_hashes": 2}, id="lsh-2rounds"),
    pytest.param("local", {"window": 400}, id="local"),
]


@pytest.mark.parametrize("sparse,support", SUPPORTS)
@pytest.mark.parametrize("is_causal,padded", MASKS)
def test_sparse_correction_covering_every_pair_is_exact(sparse, support, is_causal, padded):
    """Support = all pairs makes f~ the exact attention matrix: the corrected chain is then the exact
    backward, even at logit bounds (~30) where the plain chain is useless. GQA, S != N, Dv != D."""
    q, k, v, do = qkv(n=45, s=45 if is_causal else 52, v_dim=5, gamma=2.0)
    kpm = None
    if padded:
        kpm = torch.zeros(2, k.shape[2], dtype=torch.bool)
        kpm[1, -9:] = True
    assert float(lora.logit_bound(q, k, 8**-0.5).min()) > 10
    stats = lora.ChainedGradientStats()
    exact = grads(lambda q, k, v: sa.dense_attention(q, k, v, is_causal=is_causal, key_padding_mask=kpm), q, k, v, do)
    chain = grads(
        lambda q, k, v: lora.chained_lowrank_attention(
            q, k, v, is_causal=is_causal, key_padding_mask=kpm, threshold=0, sparse=sparse, num_features=16,
            seed=0, stats=stats, **support,
        ),
        q, k, v, do,
    )
    assert (stats.approximate, stats.sparse, stats.fallback) == (4, 4, 0)
    for a, b in zip(chain[1:], exact[1:]):
        assert rel(a, b) < 1e-10


def dense_corrected_matrix(u1, v1, correction, n_q, n_k, is_causal):
    """f~ = U1 V1^T + C~ as a dense (B, Hkv, G, N, S) matrix, written independently of the chain."""
    f = u1 @ v1.unsqueeze(2).transpose(-1, -2)
    if is_causal:
        f = f * torch.ones(n_q, n_k, dtype=torch.bool).tril()
    tiles = correction.tiles
    mask = tiles.mask
    rows = tiles.q_pos.unsqueeze(-1).expand(mask.shape)
    cols = tiles.k_pos.unsqueeze(-2).expand(mask.shape)
    lead = [torch.arange(n).reshape([-1] + [1] * (mask.dim() - 1 - d)).expand(mask.shape)
            for d, n in enumerate(mask.shape[:3])]
    sparse = torch.zeros(*f.shape[:3], n_q + 1, n_k + 1, dtype=f.dtype)
    sparse.index_put_((*lead, rows, cols), torch.where(mask, correction.weights, 0.0), accumulate=True)
    return f + sparse[..., :n_q, :n_k]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("sparse", ["lsh", "local"])
def test_sparse_corrected_chain_equals_the_dense_formula(sparse, is_causal):
    """Partial support: the corrected factorisation is row-stochastic, its rows of dS~ sum to zero, and
    the O(N m D^2 + nnz D) chain equals dS~ = f~ * (dO V^T) - diag(rho~) f~ evaluated densely."""
    q, k, v, do = qkv(batch=1, heads=4, kv_heads=2, n=60, dim=8, gamma=1.5)
    batch, heads, n, dim = q.shape
    qg, dog = q.reshape(1, 2, 2, n, dim), do.reshape(1, 2, 2, n, dim)
    gen = torch.Generator().manual_seed(0)
    w = sa.features.draw_feature_matrix(16, dim, generator=gen).double()
    proj = sa.features.draw_hash_projections(2, dim, generator=gen)
    if sparse == "lsh":
        plan = sa.sparsity.lsh_plan(q, k, bucket_size=8, hash_projections=proj)
        settings = dict(sparse="lsh", bucket_size=8, n_hashes=2, hash_projections=proj)
    else:
        plan = sa.sparsity.local_plan(n, n, window=6, device=q.device)
        settings = dict(sparse="local", window=6)
    scale = dim**-0.5
    u1, v1, correction, underflow = lora.sparse_corrected_factors(qg, k, w, scale, plan, is_causal=is_causal)
    assert not underflow.any()
    support = correction.tiles.mask.sum().item()
    assert 0 < support < 2 * 2 * n * n / 3  # partial: most pairs are off the support
    f = dense_corrected_matrix(u1, v1, correction, n, n, is_causal)
    assert (f.sum(-1) - 1).abs().max() < 1e-12
    # it is Scatterbrain's matrix: exp(s) on the support, phi . phi elsewhere, row-normalised
    implied = sa.implied_attention(q, k, num_features=16, feature_matrix=w.float(), is_causal=is_causal, **settings)
    assert (f.reshape(implied.shape) - implied).abs().max() < 1e-12
    d_p = dog @ v.unsqueeze(2).transpose(-1, -2)
    d_s = f * d_p - (f * d_p).sum(-1, keepdim=True) * f
    assert d_s.sum(-1).abs().max() < 1e-12
    want = (scale * d_s @ k.unsqueeze(2), scale * (d_s.transpose(-1, -2) @ qg).sum(2), (f.transpose(-1, -2) @ dog).sum(2))
    got = lora.sparse_corrected_backward(qg, k, v, dog, u1, v1, correction, scale, is_causal=is_causal)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12
    # the sparse part matters: dropping it changes dq
    plain = lora.chained_attention_backward(qg, k, v, dog, u1, v1, scale, is_causal=is_causal)
    assert rel(plain[0], want[0]) > 1e-3


def test_three_tiers_plain_corrected_exact():
    """threshold < bound <= sparse_threshold takes the corrected chain; above it, exact; below, plain."""
    q, k, v, do = qkv(batch=2, heads=4, kv_heads=2, n=64, dim=8, gamma=0.3)
    q = q.clone()
    q[0, 2:] *= 8  # group (0, 1): between the thresholds
    q[1, 2:] *= 40  # group (1, 1): above both
    bounds = lora.logit_bound(q, k, 8**-0.5)
    assert bounds[0, 0] < 1 and bounds[1, 0] < 1 and 1 < bounds[0, 1] < 10 < bounds[1, 1]
    stats = lora.ChainedGradientStats()
    settings = dict(threshold=1.0, sparse="local", window=8, sparse_threshold=10.0, num_features=16, seed=0, stats=stats)
    mixed = grads(lambda q, k, v: lora.chained_lowrank_attention(q, k, v, **settings), q, k, v, do)
    assert (stats.approximate, stats.sparse, stats.fallback) == (3, 1, 1)
    exact = grads(lambda q, k, v: sa.dense_attention(q, k, v), q, k, v, do)
    plain = grads(lambda q, k, v: lora.chained_lowrank_attention(q, k, v, threshold=None, num_features=16, seed=0), q, k, v, do)
    corrected = grads(lambda q, k, v: lora.chained_lowrank_attention(
        q, k, v, threshold=0, sparse="local", window=8, num_features=16, seed=0), q, k, v, do)
    # group (b, h): query heads 2h, 2h + 1
    for g in range(1, 4):  # dq, dk, dv
        kv_first = g > 1
        for (b, h), source in (((0, 0), plain), ((1, 0), plain), ((0, 1), corrected), ((1, 1), exact)):
            sel = (b, h) if kv_first else (b, slice(2 * h, 2 * h + 2))
            assert (mixed[g][sel] - source[g][sel]).abs().max() < 1e-12, (g, b, h)
    assert (plain[1][0, 2:] - corrected[1][0, 2:]).abs().max() > 1e-6  # the tiers really differ


def test_sparse_corrected_module_owns_its_projections():
    attn = lora.ChainedLowRankAttention(8, num_features=16, sparse="lsh", bucket_size=16, n_hashes=2, threshold=0, seed=3)
    assert attn.hash_projections.shape == (2, 10) and "sparse='lsh'" in repr(attn)
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=2, n=40, dim=8, gamma=1.0)
    first = grads(lambda q, k, v: attn(q, k, v, is_causal=True), q, k, v, do)
    assert attn.stats.sparse == 2 and all(torch.isfinite(g).all() for g in first)
    clone = lora.ChainedLowRankAttention(8, num_features=16, sparse="lsh", bucket_size=16, n_hashes=2, threshold=0, seed=4)
    clone.load_state_dict(attn.state_dict())
    again = grads(lambda q, k, v: clone(q, k, v, is_causal=True), q, k, v, do)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sparse_corrected_chain_with_kronecker_kernels(is_causal):
    """The corrected chain with the Triton Kronecker kernels (interpreter on CPU) against torch, fp32."""
    q, k, v, do = qkv(batch=1, heads=2, kv_heads=1, n=70, dim=16, v_dim=8, gamma=0.8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (t.float().to(device) for t in (q, k, v, do))
    results = {
        backend: grads(lambda q, k, v: lora.chained_lowrank_attention(
            q, k, v, num_features=16, seed=0, threshold=0, sparse="lsh", bucket_size=16, is_causal=is_causal,
            backend=backend), q, k, v, do)
        for backend in ("reference", "triton")
    }
    for a, b in zip(results["triton"][1:], results["reference"][1:]):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sparse_corrected_chain_is_finite_at_large_norms(dtype, is_causal):
    """Query and key norms of 25 (logit bound ~80): no inf or NaN, no group needs the underflow fallback."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 512, 64, generator=gen) for _ in range(2))
    q, k = (x / x.norm(dim=-1, keepdim=True) * 25 for x in (q, k))
    v = torch.randn(1, 2, 512, 64, generator=gen)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    stats = lora.ChainedGradientStats()
    out = lora.chained_lowrank_attention(q, k, v, is_causal=is_causal, threshold=0, sparse="lsh", bucket_size=64,
                                         num_features=64, seed=0, stats=stats)
    out.float().pow(2).sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))
    assert (stats.sparse, stats.fallback) == (2, 0)


@pytest.mark.parametrize("threshold", [None, 0.0], ids=["chain", "exact-fallback"])
def test_second_derivatives_are_refused(threshold):
    """The chained backward has no derivative of its own: a backward with create_graph=True (for
    a gradient of the gradient) raises instead of building a graph that would only follow
    grad_out (a wrong second-order term), on the chained and on the exact-fallback path."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = lora.chained_lowrank_attention(q, k, v, factors="exact", threshold=threshold, stats=None)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
    (grad_q,) = torch.autograd.grad((out ** 2).sum(), q)  # first derivatives as before
    assert torch.isfinite(grad_q).all()


@pytest.mark.parametrize("is_causal", [False, True], ids=["non-causal", "causal"])
def test_exact_forward_with_padding_is_sdpa_with_a_mask(monkeypatch, is_causal):
    """The exact forward (and exact fallback) take key padding as an SDPA mask, not through the
    dense reference's N x S scores: equal to dense attention in float64, out and gradients, with
    a fully padded batch element and (causal, left padding) rows that see no real key, which
    give zeros and zero gradients, not NaN."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, g = (torch.randn(3, 4, 20, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    k, v = k[:, :2], v[:, :2]  # grouped heads
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[0, 15:] = True
    pad[1] = True
    pad[2, :6] = True  # left padding: causal rows 0-5 see no real key
    want = []
    for x in (q, k, v):
        x.requires_grad_()
    out = sa.dense_attention(q, k, v, key_padding_mask=pad, is_causal=is_causal)
    want = [out.detach(), *torch.autograd.grad(out, (q, k, v), g)]
    dense = sa.reference.dense_attention
    monkeypatch.setattr(sa.reference, "dense_attention", lambda *a, **kw: pytest.fail("dense reference used"))
    out = lora.chained_lowrank_attention(q, k, v, key_padding_mask=pad, is_causal=is_causal, num_features=8,
                                         seed=0, threshold=0.0, stats=None)  # real groups: the exact fallback
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), g)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    assert (got[0][1] == 0).all() and (got[1][1] == 0).all()
    monkeypatch.setattr(sa.reference, "dense_attention", dense)


def test_stats_history_is_bounded():
    """A long run's stats (one shared object sees every attention call) keep the last
    HISTORY_LENGTH backward records, the counts keep everything."""
    stats = lora.ChainedGradientStats()
    for step in range(lora.HISTORY_LENGTH + 5):
        stats.record(approximate=step, fallback=1, bound=0.5)
    assert len(stats.history) == lora.HISTORY_LENGTH
    assert stats.history[0] == (5, 1) and stats.history[-1] == (lora.HISTORY_LENGTH + 4, 1)
    assert stats.fallback == lora.HISTORY_LENGTH + 5


def test_lora_targets_are_projections_beside_each_other():
    """Only Linears whose parent holds a query, a key and a value projection are targets: an RL
    value head named `value`, or a lone `q` layer, are not."""
    model = torch.nn.ModuleDict({
        "block": TinyAttentionBlock(),
        "value": torch.nn.Linear(32, 1),
        "head": torch.nn.ModuleDict({"q": torch.nn.Linear(4, 4), "out": torch.nn.Linear(4, 4)}),
    })
    assert lora.attention_lora_targets(model, "partial") == ["block.q_proj", "block.v_proj"]
    assert lora.attention_lora_targets(model, "full") == ["block.q_proj", "block.k_proj", "block.v_proj"]
