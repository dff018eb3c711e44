"""Host cost of Triton's argument binding per kernel launch, measured without a GPU.

Every launch of a @triton.jit kernel first runs its binder (the specialisation of each argument:
dtype, 16-byte alignment, ints equal to 1 or divisible by 16) and looks up the compiled kernel by
the resulting key; only then does it call the driver. This times binder + key on this CPU for each
launch the Scatterbrain launchers make (bf16, the benchmark's shape on a small N, arguments
recorded by scatterattn.kernels.offline_compile, binder built for sm_90): the part of an eager
call's launch cost that grows with the argument count. bench/host_overhead.py stubs launches out,
so the two add up (plus the driver call, a few us per launch on a GPU host).

    python bench/launch_binding.py [--case lsh-mha] [--out bench/results/launch_binding.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real JIT functions (their binders), not the interpreter's

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import cpu_report  # noqa: E402


def binder_us(kernel, args, kwargs, calls: int = 2000) -> float:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")  # as JITFunction.run adds them
    cache = {}
    for _ in range(100):
        compute_cache_key(cache, *binder(*args, **kwargs)[1:])
    start = time.perf_counter()
    for _ in range(calls):
        compute_cache_key(cache, *binder(*args, **kwargs)[1:])
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="lsh-mha", help="a case of offline_compile.SCATTERBRAIN_CASES")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from scatterattn.kernels import offline_compile as oc

    recorders = oc.record_scatterbrain(torch.bfloat16, oc.SCATTERBRAIN_CASES[args.case], n=args.n)
    if oc.SCATTERBRAIN_CASES[args.case]["sparse"] == "lsh":
        recorders.update(oc.record_lsh_hash(torch.bfloat16, n=args.n))
    lines = ["| kernel | arguments | binder + key us |", "|---|---|---|"]
    for name, rec in recorders.items():
        launch_args, launch_kwargs = rec.launches[0]
        us = binder_us(rec.kernel, launch_args, launch_kwargs)
        lines.append(f"| {name} | {len(launch_args) + len(launch_kwargs)} | {us:.1f} |")
    return cpu_report(
        "Triton argument binding per launch",
        f"case {args.case}, bf16, N {args.n}, binder for sm_90. `bench/launch_binding.py`; the driver call "
        "comes on top.", lines, args.out)


if __name__ == "__main__":
    main()
