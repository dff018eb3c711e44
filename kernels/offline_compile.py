"""Compile kernel launches for a GPU that is not there: Triton's real compiler on the CPU.

The launchers run with a `Recorder` standing in for each @triton.jit kernel, so nothing executes;
each recorded launch (its real arguments, constexprs and num_warps) is then compiled for the
target (default sm_90, an H100/H200) down to cubin, and its resource usage is read from the cubin
with the cuobjdump that ships with Triton: registers per thread, spill stack, shared memory.
Used by tests/test_kernels_compile.py (the code compiles, shared memory fits) and by
bench/kernel_resources.py (register pressure of each launch configuration).

The process must import triton with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

SM90_SHARED_LIMIT = 232448  # bytes of dynamic shared memory per block on H100/H200


class Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments instead of running."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))

        return launch


def record(module, names):
    """Replace module.<name> by a Recorder for each name; returns {name: Recorder}. Undo with `restore`."""
    recorders = {}
    for name in names:
        recorders[name] = Recorder(getattr(module, name))
        setattr(module, name, recorders[name])
    return recorders


def restore(module, recorders) -> None:
    for name, rec in recorders.items():
        setattr(module, name, rec.kernel)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Of a cubin's kernel: 'registers' and 'spill_stack' (`cuobjdump --dump-resource-usage`), and
    from its SASS the matrix instructions, 'hgmma' (Hopper warpgroup MMA) and 'hmma' (the older
    warp-level MMA, slower on Hopper), and 'local' (LDL/STL: local-memory loads and stores)."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if not found:
        raise RuntimeError(f"no resource line in cuobjdump output: {text[-500:]}")
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", _cuobjdump(cubin, "--dump-sass"))
    if not opcodes:
        raise RuntimeError("no instructions in cuobjdump --dump-sass output")
    return {"registers": int(found.group(1)), "spill_stack": int(found.group(2)),
            "hgmma": opcodes.count("HGMMA"), "hmma": opcodes.count("HMMA"),
            "local": opcodes.count("LDL") + opcodes.count("STL")}


def compile_launch(kernel, args, kwargs, *, arch: int = 90, usage: bool = False) -> dict:
    """Compile one recorded launch as the JIT would: the same binder specialises the arguments
    (integers divisible by 16 and 16-byte aligned pointers get tt.divisibility = 16, integers equal
    to 1 become constants), which decides vectorisation and so registers. Returns {'kernel',
    'shared', 'num_warps', 'blocks'} and, with usage=True, 'registers' and 'spill_stack' (bytes per
    thread; 0 means no spills). Uses the JIT's internal binder (same in triton 3.6 and 3.9)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options.__dict__)
    result = {
        "kernel": kernel.fn.__name__,
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "blocks": {k: v for k, v in bound.items() if k.startswith("BLOCK")},
    }
    if usage:
        result.update(resource_usage(compiled.asm["cubin"]))
    return result


def compile_all(recorders, *, usage: bool = False) -> list[dict]:
    """Compile each distinct recorded launch (by constexprs, options and argument dtypes)."""
    results = []
    for name, rec in recorders.items():
        if not rec.launches:
            raise AssertionError(f"{name} was never launched")
        seen = set()
        for args, kwargs in rec.launches:
            key = (name, tuple(sorted(kwargs.items())),
                   tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))
            if key in seen:
                continue
            seen.add(key)
            results.append(compile_launch(rec.kernel, args, kwargs, usage=usage))
    return results


# ----------------------------------------------------------------------------- this package's launches

SCATTERBRAIN_CASES = {
    "lsh-2-rounds": dict(sparse="lsh", bucket_size=128, n_hashes=2, num_features=256),
    "lsh": dict(sparse="lsh", bucket_size=128, n_hashes=1, num_features=256),
    "local": dict(sparse="local", window=128, num_features=256),
    "lsh-only": dict(sparse="lsh", bucket_size=64, num_features=0),
    # one query head per key/value head (the benchmark's shape), no padding: the full-tile dk/dv
    # kernel writes dk, dv once
    "lsh-mha": dict(sparse="lsh", bucket_size=128, n_hashes=1, num_features=256, kv_heads=4, padded=False),
}


def record_scatterbrain(dtype, settings, *, dim=64, n=300, forward=None, backward=None):
    """Run the Scatterbrain launchers (key state, forward, backward) on a small input of `settings`
    (4 query heads over `kv_heads` key/value heads, 2 by default, and the last 7 keys padding unless
    `padded` is False) with every kernel recorded; forward / backward: extra keyword arguments of the
    launchers (block sizes, num_warps). Returns the recorders of the kernels the launchers launched."""
    import math

    from scatterattn import functional

    from . import scatterbrain_bwd, scatterbrain_fwd

    fwd_names = ["sparse_lowrank_fwd_kernel", "full_tile_fwd_kernel", "key_state_kernel", "combine_key_state_kernel"]
    bwd_names = ["row_delta_kernel", "sparse_lowrank_bwd_dq_kernel", "sparse_lowrank_bwd_dkdv_kernel",
                 "full_tile_bwd_dq_kernel", "full_tile_bwd_dkdv_kernel", "query_state_kernel", "key_lowrank_bwd_kernel"]
    fwd_rec, bwd_rec = record(scatterbrain_fwd, fwd_names), record(scatterbrain_bwd, bwd_names)
    try:
        settings = dict(settings)
        kv_heads, padded = settings.pop("kv_heads", 2), settings.pop("padded", True)
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, n, dim, generator=gen).to(dtype)
        k = torch.randn(1, kv_heads, n, dim, generator=gen).to(dtype)
        v = torch.randn(1, kv_heads, n, dim, generator=gen).to(dtype)
        kpm = None
        if padded:
            kpm = torch.zeros(1, n, dtype=torch.bool)
            kpm[0, -7:] = True
        p = functional.prepare_call(q, k, v, key_padding_mask=kpm, seed=0, **settings)
        w = None if p.feature_matrix is None else p.feature_matrix.to(dtype)
        state = None
        if w is not None:
            # several key splits, so that the merge kernel runs (one split, n <= 1024, skips it)
            split = scatterbrain_fwd.per_pair_plan(p.plan, True, dim, dim)
            state = scatterbrain_fwd.key_state(k, v, w, p.key_valid, math.sqrt(p.scale), split=split,
                                               keys_per_split=128)
            state = tuple(torch.zeros_like(t) for t in state)
        out, den, stab = scatterbrain_fwd.sparse_lowrank_forward(
            q, k, v, w, state, p.plan, tau=p.scale, key_valid=p.key_valid, out_dtype=dtype, **(forward or {})
        )
        scatterbrain_bwd.sparse_lowrank_backward(
            q, k, v, torch.zeros_like(out), torch.zeros_like(out), w, state, p.plan, torch.ones_like(den),
            torch.zeros_like(stab), tau=p.scale, key_valid=p.key_valid, **(backward or {}),
        )
    finally:
        restore(scatterbrain_fwd, fwd_rec)
        restore(scatterbrain_bwd, bwd_rec)
    return {name: rec for name, rec in {**fwd_rec, **bwd_rec}.items() if rec.launches}


def record_chained(dtype, *, n=1024, dim=64, num_features=256, tf32=False, **config):
    """Run the chained-gradient Kronecker launchers (m 256, D 64 by default) for inputs of `dtype`
    (operands as `chained_grad.operand_dtype`) with the kernels recorded; config: launcher block
    sizes / num_warps / num_stages. n = 1024 keeps the row counts and strides multiples of 16, as at
    the benchmark's sequence lengths, so the binder specialises them as it would there. tf32: fp32
    operands as when torch allows TF32 matmuls."""
    from . import chained_grad

    op_dtype = chained_grad.operand_dtype(dtype, "cuda")
    recorders = record(chained_grad, ["kron_gram_kernel", "kron_rows_kernel"])
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a, b, c = torch.rand(2, n, num_features), torch.randn(2, n, dim), torch.randn(2, n, dim)
        chained_grad.kron_gram(a, b, c, op_dtype=op_dtype, **config)
        chained_grad.kron_rows(a, b, torch.zeros(2, num_features, dim, dim), op_dtype=op_dtype, **config)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        restore(chained_grad, recorders)
    return recorders


def record_lsh_hash(dtype, *, n=1024, dim=64, n_hashes=2):
    """Run the LSH hashing launcher (norms, projections and XBOX+ hashes of q and k; GQA, N = S
    and N != S, with and without key padding) with the kernels recorded."""
    from . import lsh_hash

    recorders = record(lsh_hash, ["norms_projections_kernel", "xbox_hash_kernel"])
    try:
        q, directions = torch.randn(1, 4, n, dim).to(dtype), torch.randn(n_hashes, dim + 2)
        for n_k, padded in ((n, False), (n // 2, True)):
            valid = torch.ones(1, n_k, dtype=torch.bool)
            valid[0, -7:] = False
            lsh_hash.xbox_hashes(q, torch.randn(1, 2, n_k, dim).to(dtype), directions, valid if padded else None)
    finally:
        restore(lsh_hash, recorders)
    return recorders
