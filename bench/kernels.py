"""Kernel microbenchmark: Scatterbrain Triton kernels against the PyTorch reference, dense SDPA
(its default backend: cuDNN on an H200) and FlexAttention with a sliding window of the bucket's width.

    python bench/kernels.py                      # N = 1k, 4k, 16k, 64k; B 1, H 16, D 64, bf16
    python bench/kernels.py --seq-lens 1024 4096 --out bench/results

Times are medians of triton.testing.do_bench (ms); peak memory is torch.cuda.max_memory_allocated
over one call, inputs included (MiB). Writes a markdown table, a JSON file and a PNG plot under
--out, and prints the table last, with the issue's targets checked against SDPA. Needs CUDA.
Unless --no-profile, one forward+backward of SB-LSH and SB-Local at the largest N is profiled
(bench/profile_breakdown.py: kernels, sorting, torch glue, launch count) and the tables are added.
With --compiled, SB-LSH is also timed under torch.compile(mode="reduce-overhead") (inductor and CUDA
graphs around the kernels' custom operators): what a compiled model pays. --methods picks methods.
Unless --no-graphs, SDPA, SB-LSH and SB-Local up to --graph-max-len are also timed replayed from a
CUDA graph (triton.testing.do_bench_cudagraph): device time without Python and launch overhead,
which is what the eager times above it are made of at small N. Targets are checked on eager times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

METHODS = ("sdpa", "sb-lsh", "sb-local", "flex-window", "sb-lsh-reference", "sb-lsh-compiled")  # table order
PRIMARY = ("sdpa", "sb-lsh", "sb-local")  # measured first (largest N first)
GRAPHED = ("sdpa", "sb-lsh", "sb-local")


def build_methods(args, device):
    import scatterattn as sa

    dim = args.head_dim
    common = dict(num_features=args.features, bucket_size=args.bucket, window=args.bucket, seed=0)
    sb_lsh = sa.ScatterbrainAttention(dim, sparse="lsh", backend="triton", **common).to(device)
    sb_local = sa.ScatterbrainAttention(dim, sparse="local", backend="triton", **common).to(device)
    sb_ref = sa.ScatterbrainAttention(dim, sparse="lsh", backend="reference", **common).to(device)
    methods = {
        "sdpa": torch.nn.functional.scaled_dot_product_attention,
        "sb-lsh": sb_lsh,
        "sb-local": sb_local,
        "sb-lsh-reference": sb_ref,
    }
    if args.compiled:  # the whole call compiled (inductor) and replayed from CUDA graphs
        methods["sb-lsh-compiled"] = torch.compile(sb_lsh, mode="reduce-overhead")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)
        half = args.bucket // 2
        masks = {}

        def window(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx <= half) & (kv_idx - q_idx <= half)

        def flex(q, k, v):
            n = q.shape[2]
            if n not in masks:
                masks[n] = create_block_mask(window, None, None, n, n, device=q.device)
            return compiled(q, k, v, block_mask=masks[n])

        methods["flex-window"] = flex
    except Exception as exc:  # FlexAttention is optional: report it, do not hide other results
        print(f"flex-window unavailable: {exc!r}", file=sys.stderr)
    return methods


def measure(fn, q, k, v, backward: bool):
    import triton.testing

    grad = torch.randn_like(q) if backward else None

    def step():
        out = fn(q, k, v)
        if backward:
            out.backward(grad)
        return out

    step()  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    ms = triton.testing.do_bench(step, grad_to_none=[q, k, v] if backward else None, return_mode="median")
    return ms, peak


def measure_graphed(fn, q, k, v, backward: bool):
    """Median ms of fn (and its backward, by torch.autograd.grad) replayed from a CUDA graph."""
    import triton.testing

    grad = torch.randn_like(q) if backward else None

    def step():
        out = fn(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    return triton.testing.do_bench_cudagraph(step, rep=10, return_mode="median")


def run(args, names=METHODS, max_len=None, graphed=False, budget_s=None):
    """One row per (N, method, mode): ms and peak_mib (eager) or device_ms (graphed), or error.
    Past budget_s seconds the remaining rows are recorded as skipped, so that the caller still
    writes its table within a time limit."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    methods = build_methods(args, device)
    rows = []
    # The headline rows first (SDPA and the kernels, largest N first), so that a time budget
    # cuts the peers and small N rather than the 64k targets; then the compiled module and
    # FlexAttention, largest N first too (their targets are at 4k and 64k); the reference last,
    # smallest N first (it is slow and large at 64k).
    lengths = [n for n in args.seq_lens if max_len is None or n <= max_len]
    largest_first = sorted(lengths, reverse=True)
    order = [(n, name) for n in largest_first for name in names if name in PRIMARY]
    order += [(n, name) for n in largest_first for name in names if name not in PRIMARY + ("sb-lsh-reference",)]
    order += [(n, name) for n in sorted(lengths) for name in names if name == "sb-lsh-reference"]
    for n, name in order:
        if name not in methods:
            continue
        if name == "sb-lsh-reference" and n > args.reference_max_len:
            continue
        for backward in (False, True):
            gen = torch.Generator(device=device).manual_seed(n)
            shape = (args.batch, args.heads, n, args.head_dim)
            q, k, v = (
                torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_(backward)
                for _ in range(3)
            )
            mode = "fwd+bwd" if backward else "fwd"
            label = f"N={n:>6} {name:<17} {mode:<7}{' graph' if graphed else ''}"
            if deadline is not None and time.monotonic() > deadline:
                rows.append(dict(n=n, method=name, mode=mode, error=f"skipped: time budget of {budget_s} s"))
                print(f"{label} skipped: time budget of {budget_s} s", file=sys.stderr, flush=True)
                continue
            try:
                if graphed:
                    result = dict(device_ms=measure_graphed(methods[name], q, k, v, backward))
                else:
                    ms, peak = measure(methods[name], q, k, v, backward)
                    result = dict(ms=ms, peak_mib=peak)
                print(label, " ".join(f"{key}={value:.3f}" for key, value in result.items()),
                      file=sys.stderr, flush=True)
            except Exception as exc:
                print(f"{label} failed: {exc!r}", file=sys.stderr, flush=True)
                result = dict(error=repr(exc))
            rows.append(dict(n=n, method=name, mode=mode, **result))
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def device_table(eager_rows, graph_rows) -> str:
    """Markdown: eager and CUDA-graph medians per (N, method, mode); host share = 1 - graph / eager."""
    lines = ["| N | method | mode | eager ms | graph ms | host share |", "|---|---|---|---|---|---|"]
    for r in graph_rows:
        eager = lookup(eager_rows, r["n"], r["method"], r["mode"])
        graph = f"{r['device_ms']:.3f}" if "device_ms" in r else "failed"
        eager_ms = f"{eager['ms']:.3f}" if eager else "-"
        share = f"{max(0.0, 1 - r['device_ms'] / eager['ms']):.0%}" if eager and "device_ms" in r else "-"
        lines.append(f"| {r['n']:,} | {r['method']} | {r['mode']} | {eager_ms} | {graph} | {share} |")
    return "\n".join(lines)


def profile_tables(args) -> str:
    """Markdown: where one forward+backward of the Scatterbrain methods spends device time."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_breakdown import breakdown

    device, dtype, n = torch.device("cuda"), getattr(torch, args.dtype), max(args.seq_lens)
    methods = build_methods(args, device)
    gen = torch.Generator(device=device).manual_seed(n)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)
    parts = []
    for name in ("sb-lsh", "sb-local"):
        def step(fn=methods[name]):
            fn(q, k, v).backward(grad)
            for t in (q, k, v):
                t.grad = None
        try:
            parts.append(f"### {name}, N={n:,}, forward+backward\n\n{breakdown(step)['table']}\n")
        except Exception as exc:  # a failed profile is reported, not fatal
            parts.append(f"### {name}, N={n:,}: profile failed: {exc!r}\n")
    return "\n## Where the time goes\n\n" + "\n".join(parts)


def lookup(rows, n, method, mode):
    for r in rows:
        if r["n"] == n and r["method"] == method and r["mode"] == mode and "ms" in r:
            return r
    return None


def table(rows, seq_lens):
    lines = ["| N | method | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | fwd speed-up vs SDPA | fwd+bwd speed-up vs SDPA |",
             "|---|---|---|---|---|---|---|---|"]
    for n in seq_lens:
        sdpa_f, sdpa_b = lookup(rows, n, "sdpa", "fwd"), lookup(rows, n, "sdpa", "fwd+bwd")
        for name in METHODS:
            f, b = lookup(rows, n, name, "fwd"), lookup(rows, n, name, "fwd+bwd")
            if f is None and b is None:
                continue

            def cell(r, key, fmt):
                return fmt.format(r[key]) if r else "-"

            def ratio(base, r):
                return f"{base['ms'] / r['ms']:.2f}x" if base and r else "-"

            lines.append(
                f"| {n:,} | {name} | {cell(f, 'ms', '{:.3f}')} | {cell(b, 'ms', '{:.3f}')} | "
                f"{cell(f, 'peak_mib', '{:.0f}')} | {cell(b, 'peak_mib', '{:.0f}')} | "
                f"{ratio(sdpa_f, f)} | {ratio(sdpa_b, b)} |"
            )
    return "\n".join(lines)


def targets(rows):
    """The issue's targets, each as (description, measured, met)."""
    out = []

    def speedup(n, method, mode):
        base, r = lookup(rows, n, "sdpa", mode), lookup(rows, n, method, mode)
        return base["ms"] / r["ms"] if base and r else None

    def why_missing(n, mode):
        """'not measured (<the row's error>)' for a headline pair without both times."""
        errors = [r["error"] for r in rows if r["n"] == n and r["mode"] == mode and r["method"] in ("sdpa", "sb-lsh")
                  and "error" in r]
        return "not measured" + (f" ({errors[0]})" if errors else " (no row)")

    for n, mode, want in ((65536, "fwd", 15), (65536, "fwd+bwd", 8), (16384, "fwd", 3)):
        got = speedup(n, "sb-lsh", mode)
        desc = f"N={n} {mode}: SB-LSH >= {want}x faster than SDPA"
        out.append((desc, f"{got:.2f}x", got >= want) if got is not None else (desc, why_missing(n, mode), False))
    for n in (4096, 16384, 65536):
        for mode in ("fwd", "fwd+bwd"):
            got = speedup(n, "sb-lsh", mode)
            if got is not None:
                out.append((f"N={n} {mode}: SB-LSH faster than SDPA", f"{got:.2f}x", got > 1))
    for n in (1024, 4096, 16384, 65536):
        for mode in ("fwd", "fwd+bwd"):
            got = speedup(n, "sb-lsh-compiled", mode)
            if got is not None:
                out.append((f"N={n} {mode}: SB-LSH under torch.compile faster than SDPA", f"{got:.2f}x", got > 1))
    for n in sorted({r["n"] for r in rows}):
        for mode in ("fwd", "fwd+bwd"):
            base, r = lookup(rows, n, "sdpa", mode), lookup(rows, n, "sb-lsh", mode)
            if base and r:
                out.append((f"N={n} {mode}: SB-LSH peak memory <= SDPA's",
                            f"{r['peak_mib']:.0f} vs {base['peak_mib']:.0f} MiB", r["peak_mib"] <= base["peak_mib"]))
            ref = lookup(rows, n, "sb-lsh-reference", mode)
            if ref and r:
                got = ref["ms"] / r["ms"]
                out.append((f"N={n} {mode}: SB-LSH >= 10x faster than the reference", f"{got:.1f}x", got >= 10))
            flex, local = lookup(rows, n, "flex-window", mode), lookup(rows, n, "sb-local", mode)
            if flex and local:
                got = local["ms"] / flex["ms"]
                out.append((f"N={n} {mode}: SB-Local within 2x of FlexAttention window", f"{got:.2f}x slower", got <= 2))
    return out


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name in METHODS:
            pts = sorted((r["n"], r["ms"]) for r in rows if r["method"] == name and r["mode"] == mode and "ms" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("time (ms, median)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--reference-max-len", type=int, default=65536)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the eager measurements; later rows are skipped so the table is written")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile at the largest N")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph (device time) timings")
    parser.add_argument("--compiled", action="store_true", help="also time SB-LSH under torch.compile (reduce-overhead)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to time")
    parser.add_argument("--graph-max-len", type=int, default=16384, help="largest N timed from a CUDA graph")
    parser.add_argument("--tag", default="", help="added to the report's file name (kernels-TAG-DATE-DEVICE)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import triton

    rows = run(args, [name for name in METHODS if name in args.methods], budget_s=args.budget)
    stamp = datetime.date.today().isoformat()
    device_name = torch.cuda.get_device_name()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from provenance import git_commit

    header = (f"{stamp}, {device_name}, torch {torch.__version__}, triton {triton.__version__}, "
              f"scatterattn {git_commit()}; "
              f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}, m={args.features}, "
              f"bucket/window={args.bucket}; medians of triton.testing.do_bench")
    checks = targets(rows)
    text = f"# Kernel benchmark\n\n{header}\n\n{table(rows, args.seq_lens)}\n\n## Targets\n\n" + "\n".join(
        f"- [{'x' if met else ' '}] {desc}: {got}" for desc, got, met in checks
    ) + "\n"
    os.makedirs(args.out, exist_ok=True)
    slug = device_name.replace(" ", "-").replace("/", "-")
    base = os.path.join(args.out, "-".join(filter(None, ("kernels", args.tag, stamp, slug))))
    with open(base + ".md", "w") as fh:
        fh.write(text)
    with open(base + ".json", "w") as fh:
        json.dump(dict(header=header, rows=rows), fh, indent=1)
    plot(rows, base + ".png")
    print(text, flush=True)
    if not args.no_profile:  # after the table is safely written: a cut run keeps it
        profile = profile_tables(args)
        with open(base + ".md", "a") as fh:
            fh.write(profile)
        print(profile)
    if not args.no_graphs:
        graph_rows = run(args, GRAPHED, args.graph_max_len, graphed=True)
        section = ("\n## Device time: replayed from a CUDA graph\n\nSame inputs; `graph ms` is "
                   "triton.testing.do_bench_cudagraph's median, without Python and launch overhead; "
                   "`host share` = 1 - graph / eager, the part of the eager time that overhead makes "
                   "(an upper bound: do_bench flushes L2 before each eager call, graph replays run "
                   "back to back with warm caches).\n\n"
                   f"{device_table(rows, graph_rows)}\n")
        with open(base + ".md", "a") as fh:
            fh.write(section)
        with open(base + ".json", "w") as fh:
            json.dump(dict(header=header, rows=rows, graph_rows=graph_rows), fh, indent=1)
        print(section, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
