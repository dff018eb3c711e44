"""Host-side cost of one eager Scatterbrain call with the Triton backend, measured without a GPU.

At 1k-4k tokens an eager call's time on a GPU is mostly its host work (Python, torch op dispatch,
Triton launches), not its kernels (bench/PREDICTIONS.md). This runs the module's forward and
backward on CPU tensors with every Triton launch replaced by a counter (no kernel runs, outputs are
garbage) and the LSH hashing on the path CUDA inputs take (the hashing kernels' launchers), and
reports, per call:
  * device ops: torch ops that would launch device work on a GPU (arithmetic, sorts, fills,
    dtype copies), counted by torch.profiler;
  * Triton launches, by kernel;
  * host ms: wall time of the call on this CPU, min over trials. It includes the CPU cost of the
    torch ops on real CPU tensors (small at the default N 256) but not what a Triton launch costs
    on a GPU host (argument binding, the driver call), so it is a floor to compare commits by,
    not a prediction of a GPU's eager time.

    python bench/host_overhead.py [--seq-lens 256,4096] [--out bench/results/host_overhead.md]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors pass the kernels' device check; no launch runs

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import cpu_report  # noqa: E402

# torch ops that allocate, view or alias: no device work on a GPU (to: counted by its copies)
NO_DEVICE_WORK = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::select", "aten::reshape", "aten::slice",
    "aten::detach", "aten::expand", "aten::view", "aten::transpose", "aten::unsqueeze", "aten::t",
    "aten::_unsafe_view", "aten::to", "aten::contiguous", "aten::alias", "aten::as_strided", "aten::lift_fresh",
    "aten::permute", "aten::squeeze", "aten::unbind", "aten::split", "aten::chunk", "aten::narrow",
}
METHODS = {"sb-lsh": dict(sparse="lsh"), "sb-local": dict(sparse="local")}


class StubbedLaunches:
    """Replace every Triton launch (the interpreter's entry point) by a counter, and send the LSH
    hashing down the kernels' path, as on CUDA."""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        from scatterattn import sparsity
        from scatterattn.kernels.lsh_hash import xbox_hashes

        self.launches = collections.Counter()
        self._patches = [(InterpretedFunction, "run", InterpretedFunction.run),
                         (sparsity, "xbox_hashes", sparsity.xbox_hashes)]

        def run(fn, *args, **kwargs):
            self.launches[fn.fn.__name__] += 1

        InterpretedFunction.run = run
        sparsity.xbox_hashes = xbox_hashes
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._patches:
            setattr(owner, name, value)


def count_ops(fn, stub: StubbedLaunches) -> tuple[int, dict, dict]:
    """(device ops, {op: calls} of those, {kernel: launches}) of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    stub.launches.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    ops = collections.Counter(e.name for e in top if e.name not in NO_DEVICE_WORK)
    ops["copies (to)"] = sum(1 for e in events if e.name == "aten::_to_copy" and e.cpu_parent is not None
                             and e.cpu_parent.name == "aten::to")
    ops = {k: v for k, v in ops.items() if v}
    return sum(ops.values()), ops, dict(stub.launches)


def host_ms(fn, trials: int = 7, calls: int = 100) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def measure(n: int, method: str, args) -> list[dict]:
    import scatterattn as sa

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, dtype=torch.float16, requires_grad=True) for _ in range(3))
    mod = sa.ScatterbrainAttention(args.head_dim, backend="triton", num_features=args.features,
                                   bucket_size=args.bucket, window=args.bucket, seed=0, **METHODS[method])
    grad = torch.randn_like(q)
    rows = []
    with StubbedLaunches() as stub:
        state = {}

        def forward():
            state["out"] = mod(q, k, v)

        def backward():
            state["out"].backward(grad)

        def both():
            forward()
            backward()
            q.grad = k.grad = v.grad = None

        forward()
        for mode, fn, ops_of in (("forward", forward, forward), ("forward+backward", both, backward)):
            device_ops, ops, launches = count_ops(ops_of, stub)
            if mode == "forward+backward":  # add the forward's counts to the backward's
                fwd = rows[0]
                device_ops += fwd["device_ops"]
                ops = dict(collections.Counter(ops) + collections.Counter(fwd["ops"]))
                launches = dict(collections.Counter(launches) + collections.Counter(fwd["launches"]))
                forward()
            rows.append(dict(n=n, method=method, mode=mode, device_ops=device_ops, ops=ops, launches=launches,
                             host_ms=host_ms(fn)))
    return rows


def table(rows) -> str:
    lines = ["| N | method | mode | device ops (torch) | Triton launches | host ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        ops = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in sorted(r["ops"].items()))
        lines.append(f"| {r['n']} | {r['method']} | {r['mode']} | {r['device_ops']} ({ops}) | "
                     f"{sum(r['launches'].values())} | {r['host_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="256,4096")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--out", default=None, help="write the report (markdown) here")
    args = parser.parse_args(argv)
    rows = [row for n in map(int, args.seq_lens.split(",")) for method in args.methods.split(",")
            for row in measure(n, method, args)]
    return cpu_report(
        "Host cost of eager calls, launches stubbed",
        f"B 1, H {args.heads}, D {args.head_dim}, fp16, m {args.features}, bucket / window {args.bucket}. "
        "`bench/host_overhead.py`: no kernel runs; host ms excludes the Triton launches' own cost on a GPU "
        "host and includes the CPU cost of torch ops on CPU tensors.",
        [table(rows)], args.out)


if __name__ == "__main__":
    main()
