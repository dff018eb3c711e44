"""Time the Scatterbrain forward and backward kernels under several launch configurations (GPU).

The launch defaults (query sub-block BLOCK_Q, key chunk BLOCK_K, feature block BLOCK_F, num_warps)
were chosen without a GPU, from the register and spill counts of `bench/kernel_resources.py`. This
script measures the candidates on the GPU, one kernel at a time (the key-state and query-state
kernels are not affected), and prints the fastest per kernel:

    python bench/kernel_configs.py                       # N 16k, B 1, H 16, D 64, bf16, m 256, bucket 128
    python bench/kernel_configs.py --seq-len 65536 --head-dim 128

Times are medians of triton.testing.do_bench (ms) of the whole launcher call (`sparse_lowrank_forward`,
`sparse_lowrank_backward`: its state kernels too, which no configuration changes), on one LSH plan.
Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch

# (block_q, block_k, block_f, num_warps); None = the launcher's default
FORWARD = [None, (64, 64, 32, 4), (64, 64, 16, 4), (64, 128, 32, 8), (128, 64, 16, 8), (128, 64, 32, 8),
           (128, 128, 32, 8), (64, 32, 32, 4)]
BACKWARD = [None, (64, 32, 16, 4), (64, 32, 32, 4), (64, 64, 16, 8), (64, 16, 16, 4), (128, 16, 16, 8),
            (128, 32, 16, 8), (128, 64, 32, 8)]


def as_kwargs(config):
    if config is None:
        return {}
    return dict(zip(("block_q", "block_k", "block_f", "num_warps"), config))


def main(argv=None):
    import triton
    import triton.testing

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
    state = scatterbrain_fwd.key_state(k, v, w, None, math.sqrt(prepared.scale))
    plan, tau = prepared.plan, prepared.scale
    out, den, stab = scatterbrain_fwd.sparse_lowrank_forward(q, k, v, w, state, plan, tau=tau, key_valid=None,
                                                             out_dtype=dtype)

    print(f"# kernel launch configurations, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"N {args.seq_len}, H {args.heads}, D {args.head_dim}, bf16, m {args.features}, bucket {args.bucket}")
    for name, configs in (("forward", FORWARD), ("backward", BACKWARD)):
        rows = []
        for config in configs:
            kwargs = as_kwargs(config)
            if name == "forward":
                def call():
                    scatterbrain_fwd.sparse_lowrank_forward(q, k, v, w, state, plan, tau=tau, key_valid=None,
                                                            out_dtype=dtype, **kwargs)
            else:
                def call():
                    scatterbrain_bwd.sparse_lowrank_backward(q, k, v, out, grad_out, w, state, plan, den, stab,
                                                             tau=tau, key_valid=None, **kwargs)
            try:
                call()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(call, return_mode="median")
            except Exception as exc:  # a configuration that does not compile or run is reported, not fatal
                print(f"{name} {config}: failed: {exc!r}"[:300])
                continue
            rows.append((ms, "default" if config is None else str(config)))
        rows.sort()
        print(f"\n{name}: (block_q, block_k, block_f, num_warps) -> median ms")
        for ms, label in rows:
            print(f"  {label:24s} {ms:8.3f}")
        if rows:
            print(f"- [{name}] fastest: {rows[0][1]} at {rows[0][0]:.3f} ms")


if __name__ == "__main__":
    main()
