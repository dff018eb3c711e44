"""Compile every kernel launch for an H100/H200 (sm_90) on the CPU, through Triton's real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin), with the exact arguments the launchers pass.

The interpreter accepts code the compiler rejects (non-constexpr globals, dot shapes under 16,
type mismatches in loops); this catches that without a GPU, and checks that each kernel's shared
memory fits the 227 KiB an sm_90 block may use. The launchers run with a recording stand-in for
each kernel, so no kernel executes here. With a GPU the real launches in test_kernels*.py cover this.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile for real")

SM90_SHARED_LIMIT = 232448  # bytes of dynamic shared memory per block on H100/H200
TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1",
}


def _triton():
    """The real compiler (the test runs this module in a subprocess with TRITON_INTERPRET=0)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton, GPUTarget("cuda", 90, 32), ASTSource


class Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments instead of running."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))

        return launch


def compile_launch(kernel, args, kwargs):
    names = kernel.arg_names
    values = dict(zip(names, args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values.update(kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{param.name}: cannot type {value!r}")
    triton, sm90, ast_source = _triton()
    src = ast_source(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=sm90, options=options)
    return compiled.metadata.shared


def record(module, names):
    recorders = {}
    for name in names:
        recorders[name] = Recorder(getattr(module, name))
        setattr(module, name, recorders[name])
    return recorders


def compile_all(recorders):
    """Compile each distinct launch; returns {kernel: [shared bytes per variant]}."""
    report = {}
    for name, rec in recorders.items():
        assert rec.launches, f"{name} was never launched"
        seen = set()
        for args, kwargs in rec.launches:
            key = tuple(sorted((k, v) for k, v in kwargs.items())) + tuple(
                (a.dtype if isinstance(a, torch.Tensor) else type(a)) for a in args
            )
            if key in seen:
                continue
            seen.add(key)
            report.setdefault(name, []).append(compile_launch(rec.kernel, args, dict(kwargs)))
    return report


def scatterbrain_launches(dtype, settings, dim=64, n=300):
    from scatterattn import functional as F
    from scatterattn.kernels import scatterbrain_bwd, scatterbrain_fwd

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, dim, generator=gen).to(dtype)
    k = torch.randn(1, 2, n, dim, generator=gen).to(dtype)
    v = torch.randn(1, 2, n, dim, generator=gen).to(dtype)
    kpm = torch.zeros(1, n, dtype=torch.bool)
    kpm[0, -7:] = True
    p = F.prepare_call(q, k, v, key_padding_mask=kpm, seed=0, **settings)
    w = None if p.feature_matrix is None else p.feature_matrix.to(dtype)
    state = None
    if w is not None:
        state = scatterbrain_fwd.key_state(k, v, w, p.key_valid, math.sqrt(p.scale))
        state = tuple(torch.zeros_like(t) for t in state)
    out, den, stab = scatterbrain_fwd.sparse_lowrank_forward(
        q, k, v, w, state, p.plan, tau=p.scale, key_valid=p.key_valid, out_dtype=dtype
    )
    scatterbrain_bwd.sparse_lowrank_backward(
        q, k, v, torch.zeros_like(out), torch.zeros_like(out), w, state, p.plan, torch.ones_like(den),
        torch.zeros_like(stab), tau=p.scale, key_valid=p.key_valid,
    )


SCATTERBRAIN_CASES = {
    "lsh-2-rounds": dict(sparse="lsh", bucket_size=128, n_hashes=2, num_features=256),
    "local": dict(sparse="local", window=128, num_features=256),
    "lsh-only": dict(sparse="lsh", bucket_size=64, num_features=0),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compile_case(case: str, dtype_name: str) -> dict:
    """Run one case's launchers with recording kernels and compile what they launched."""
    from scatterattn.kernels import chained_grad, scatterbrain_bwd, scatterbrain_fwd

    dtype = DTYPES[dtype_name]
    if case == "chained":
        recorders = record(chained_grad, ["kron_gram_kernel", "kron_rows_kernel"])
        a, b, c = torch.rand(2, 100, 256), torch.randn(2, 100, 64).to(dtype), torch.randn(2, 100, 64).to(dtype)
        chained_grad.kron_gram(a, b, c)
        chained_grad.kron_rows(a, b, torch.zeros(2, 256, 64, 64))
        return compile_all(recorders)
    settings = SCATTERBRAIN_CASES[case]
    names = ["sparse_lowrank_fwd_kernel"] + (["key_state_kernel"] if settings["num_features"] else [])
    recorders = record(scatterbrain_fwd, names)
    names = ["sparse_lowrank_bwd_kernel"]
    if settings["num_features"]:
        names += ["query_state_kernel", "key_lowrank_bwd_kernel"]
    recorders.update(record(scatterbrain_bwd, names))
    scatterbrain_launches(dtype, settings)
    return compile_all(recorders)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", [*SCATTERBRAIN_CASES, "chained"])
def test_kernels_compile_for_sm90(case, dtype_name):
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
           f"import test_kernels_compile as t; print(json.dumps(t.compile_case({case!r}, {dtype_name!r})))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = 2 if case == "chained" else (2 if SCATTERBRAIN_CASES[case]["num_features"] == 0 else 5)
    assert len(report) == expected, report
    for name, shared in report.items():
        assert all(0 < b <= SM90_SHARED_LIMIT for b in shared), (name, shared)
