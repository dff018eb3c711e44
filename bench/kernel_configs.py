"""Time the Scatterbrain and chained-gradient kernels under several launch configurations (GPU).

The launch defaults (query sub-block BLOCK_Q, key chunk BLOCK_K, feature block BLOCK_F, num_warps)
were chosen without a GPU, from the register and spill counts of `bench/kernel_resources.py`. This
script measures the candidates on the GPU, one kernel at a time (the key-state and query-state
kernels are not affected), and prints the fastest per kernel:

    python bench/kernel_configs.py                       # N 16k, B 1, H 16, D 64, bf16, m 256, bucket 128
    python bench/kernel_configs.py --seq-len 65536 --head-dim 128

Times are medians of triton.testing.do_bench (ms) of the whole launcher call (`sparse_lowrank_forward`,
`sparse_lowrank_backward`: its state kernels too, which no configuration changes), on one LSH plan
(full-tile kernels at head dims <= 64; beyond, the same candidates go to the per-pair kernels);
then the chained gradient's `kron_gram` and `kron_rows` (bf16 operands, m 256, E = D, same N and H).
Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

# (block_q, block_k, block_f, num_warps); None = the launcher's default. The benchmark's plan (one
# LSH round, D <= 64) runs the full-tile kernels (`KernelTiles.full_tiles`); these are their
# candidates, spill-free at D = 64 on triton 3.6 (bench/results/kernel_resources_triton3.6.0.md).
# Their work does not depend on the key chunk (dk/dv: the query chunk), only on the rows (keys) per
# program; larger chunks mean fewer, larger dots.
FORWARD = [None, (128, 128, 64, 8), (128, 64, 32, 8),  # 32 features: the tile state's dot on HMMA
           (128, 64, 16, 8), (64, 64, 32, 8)]
# backward, one kernel varied at a time (the other at its default): dq (rows, key chunk, ...);
# dk/dv (query chunk, keys per program, ...)
BACKWARD_DQ = [None, (128, 64, 16, 8), (64, 128, 32, 8), (64, 64, 32, 4)]
BACKWARD_DKDV = [None, (16, 128, 32, 8), (32, 64, 32, 8), (64, 64, 32, 8)]
# chained gradient (block_n, block_m, num_warps): spill-free and within shared memory at D = 64
# in bench/results/kernel_resources_triton3.6.0.md
CHAINED = [None, (64, 128, 8), (64, 256, 8), (128, 128, 8), (32, 256, 4), (32, 128, 8)]


def as_kwargs(config, names=("block_q", "block_k", "block_f", "num_warps")):
    if config is None:
        return {}
    return dict(zip(names, config))


def report(name, calls, legend):
    """Time each (label, call); print them fastest first and a '- [name] fastest' line."""
    import triton.testing

    rows = []
    for label, call in calls:
        try:
            call()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(call, return_mode="median")
        except Exception as exc:  # a configuration that does not compile or run is reported, not fatal
            print(f"{name} {label}: failed: {exc!r}"[:300])
            continue
        rows.append((ms, label))
    rows.sort()
    print(f"\n{name}: {legend} -> median ms")
    for ms, label in rows:
        print(f"  {label:24s} {ms:8.3f}")
    if rows:
        print(f"- [{name}] fastest: {rows[0][1]} at {rows[0][0]:.3f} ms", flush=True)


def main(argv=None):
    import triton

    import scatterattn as sa
    from scatterattn.kernels import scatterbrain_bwd, scatterbrain_fwd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=128)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    device, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    prepared = sa.functional.prepare_call(q, k, v, num_features=args.features, sparse="lsh",
                                          bucket_size=args.bucket, seed=0)
    w = prepared.feature_matrix.to(dtype)
    split = scatterbrain_fwd.per_pair_plan(prepared.plan, True, args.head_dim, args.head_dim)
    state = scatterbrain_fwd.key_state(k, v, w, None, math.sqrt(prepared.scale), split=split)
    plan, tau = prepared.plan, prepared.scale
    out, den, stab = scatterbrain_fwd.sparse_lowrank_forward(q, k, v, w, state, plan, tau=tau, key_valid=None,
                                                             out_dtype=dtype)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from provenance import git_commit

    print(f"# kernel launch configurations, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"scatterattn {git_commit()}")
    print(f"N {args.seq_len}, H {args.heads}, D {args.head_dim}, bf16, m {args.features}, bucket {args.bucket}")
    for name, configs in (("forward", FORWARD), ("backward_dq", BACKWARD_DQ), ("backward_dkdv", BACKWARD_DKDV)):
        calls = []
        for config in configs:
            if name == "forward":
                def call(kwargs=as_kwargs(config)):
                    scatterbrain_fwd.sparse_lowrank_forward(q, k, v, w, state, plan, tau=tau, key_valid=None,
                                                            out_dtype=dtype, **kwargs)
            else:
                def call(kwargs={name.replace("backward_", "") + "_launch": config}):
                    scatterbrain_bwd.sparse_lowrank_backward(q, k, v, out, grad_out, w, state, plan, den, stab,
                                                             tau=tau, key_valid=None, **kwargs)
            calls.append(("default" if config is None else str(config), call))
        report(name, calls, "(block_q, block_k, block_f, num_warps)")

    from scatterattn.kernels import chained_grad

    a = torch.rand(1, args.heads, args.seq_len, args.features, generator=gen, device=device) / args.seq_len
    middle = chained_grad.kron_gram(a, v, k, op_dtype=dtype)
    for name, launcher, operands in (("kron_gram", chained_grad.kron_gram, (a, v, k)),
                                     ("kron_rows", chained_grad.kron_rows, (a, grad_out, middle))):
        calls = []
        for config in CHAINED:
            kwargs = as_kwargs(config, ("block_n", "block_m", "num_warps"))

            def call(kwargs=kwargs, launcher=launcher, operands=operands):
                launcher(*operands, op_dtype=dtype, **kwargs)
            calls.append(("default" if config is None else str(config), call))
        report(name, calls, "(block_n, block_m, num_warps)")


if __name__ == "__main__":
    main()
