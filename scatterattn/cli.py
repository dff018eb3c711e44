"""`scatterattn` command line: Scatterbrain vs dense attention on a long synthetic input.

    scatterattn                      # 8192 tokens, 8 heads, head dim 64: error, time, peak memory
    scatterattn --seq-len 2048 --sparse local --window 256 --causal
    python -m scatterattn --help

`main(argv=None) -> int` is the entry point (the console script and `python -m scatterattn`).
Progress goes to stderr, the result table to stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import __version__
from .config import ScatterbrainConfig
from .features import make_generator
from .functional import (
    draw_random_parameters,
    local_attention,
    lsh_attention,
    performer_attention,
    resolve_backend,
    scatterbrain_attention,
)

NUM_TOPICS = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_REPEATS = {"cpu": 3, "cuda": 10}

DESCRIPTION = """\
Compare Scatterbrain attention (exact softmax on a sparse support + Performer low-rank
elsewhere) with dense softmax attention on one long synthetic input, and show the trade-off
against its two halves run alone: Performer only (low-rank) and LSH/local only (sparse).

For each method it prints the output's relative error against dense attention, the median
time of a few calls and the peak memory of one call."""

EPILOG = f"""\
demo input:
  q, k, v are random Gaussian (fixed --seed) with a little structure so attention is not
  uniform: every token belongs to one of {NUM_TOPICS} latent topics (per head), and
  q = (t + e1)/sqrt(2), k = (t + e2)/sqrt(2), v = (u + e3)/sqrt(2), where t is the token's
  query/key topic vector, u its value topic vector and e1, e2, e3 fresh token noise, all with
  N(0, 1) entries. Tokens of a topic attend to each other more (logit standard deviation about
  1.4 at head dim 64, scale 1/sqrt(head_dim)), and values share a per-topic direction so the
  exact output is not close to zero. The inputs are drawn on the CPU in float32, then cast to
  --dtype and moved to the device: one seed gives the same input everywhere.

methods:
  dense         torch.nn.functional.scaled_dot_product_attention (the fast dense path:
                fused kernels on CUDA, torch's CPU kernel on the CPU)
  scatterbrain  scatterattn.scatterbrain_attention(backend="auto"): on the CPU always the
                pure-PyTorch reference; on CUDA the Triton kernels when they take the
                inputs (not --causal), else the reference. The last line says which ran
  performer     the same random features alone (sparse="none")
  lsh / local   the same sparse support alone (num_features=0); lsh uses the same hash
                projections as scatterbrain, so the rows differ only in what they drop

columns:
  rel. error    ||O - O_ref||_F / ||O_ref||_F in float64, O_ref = dense attention computed
                in float32 (for --dtype float32 that is the dense row itself, hence 0)
  time          median wall time of --repeats calls after one warm-up call (synchronised
                on CUDA)
  peak mem      CUDA: torch.cuda.max_memory_allocated during one call (after an untimed
                first call) minus what was allocated before it. CPU: peak resident set size (RSS) during the warm-up
                call minus RSS before it, sampled every millisecond from /proc/self/statm
                (approximate: memory the allocator reuses without growing RSS is not seen);
                without /proc, the growth of the process's RSS high-water mark.

examples:
  scatterattn
  scatterattn --seq-len 4096 --features 128 --bucket-size 64 --n-hashes 2
  scatterattn --sparse local --window 256 --causal --device cpu
"""


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=28)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scatterattn",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    shape = parser.add_argument_group("input")
    shape.add_argument("--seq-len", type=_int_at_least(1), default=8192, metavar="N",
                       help="tokens per sequence (queries = keys) (default: 8192)")
    shape.add_argument("--heads", type=_int_at_least(1), default=8, metavar="H",
                       help="attention heads (default: 8)")
    shape.add_argument("--head-dim", type=_int_at_least(1), default=64, metavar="D",
                       help="dimension per head (default: 64)")
    shape.add_argument("--batch", type=_int_at_least(1), default=1, metavar="B",
                       help="batch size (default: 1)")
    shape.add_argument("--causal", action="store_true",
                       help="causal (top-left aligned) attention for every method")
    shape.add_argument("--seed", type=_int_at_least(0, 2**63 - 1), default=0,
                       help="seed of the inputs, random features and hash projections (default: 0)")

    approx = parser.add_argument_group("approximation")
    approx.add_argument("--features", type=_int_at_least(0), default=256, metavar="M",
                        help="random features of the low-rank (Performer) part; 0 = none (default: 256)")
    approx.add_argument("--sparse", choices=("lsh", "local", "none"), default="lsh",
                        help="exact sparse part: LSH buckets, a local window, or none (default: lsh)")
    approx.add_argument("--bucket-size", type=_int_at_least(1), default=128, metavar="C",
                        help="keys per LSH bucket, --sparse lsh (default: 128)")
    approx.add_argument("--n-hashes", type=_int_at_least(1), default=1, metavar="R",
                        help="LSH hashing rounds, --sparse lsh (default: 1)")
    approx.add_argument("--window", type=_int_at_least(0), default=128, metavar="W",
                        help="local window width, pairs with |i-j| <= W/2 are exact, --sparse local (default: 128)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto = cuda when torch.cuda.is_available(), else cpu (default: auto)")
    run.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                     help="dtype of q, k, v (default: float32 on CPU, bfloat16 on CUDA)")
    run.add_argument("--repeats", type=_int_at_least(1), default=None, metavar="K",
                     help="timed calls per method after one warm-up; the median is reported "
                          f"(default: {DEFAULT_REPEATS['cpu']} on CPU, {DEFAULT_REPEATS['cuda']} on CUDA)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.features == 0 and args.sparse == "none":
        parser.error("--features 0 with --sparse none leaves nothing to attend with")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available to this torch ({torch.__version__})")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS[args.device]
    return args


def make_inputs(batch, heads, seq_len, head_dim, *, seed, dtype, device):
    """(q, k, v), each (batch, heads, seq_len, head_dim): see 'demo input' in --help."""
    gen = make_generator(seed)
    shape = (batch, heads, seq_len, head_dim)
    topic = torch.randint(NUM_TOPICS, (batch, heads, seq_len), generator=gen)
    index = topic.unsqueeze(-1).expand(shape)
    qk_topics = torch.randn(batch, heads, NUM_TOPICS, head_dim, generator=gen)
    v_topics = torch.randn(batch, heads, NUM_TOPICS, head_dim, generator=gen)
    half = math.sqrt(0.5)

    def mix(topics):
        return ((topics.gather(2, index) + torch.randn(shape, generator=gen)) * half).to(device=device, dtype=dtype)

    return mix(qk_topics), mix(qk_topics), mix(v_topics)


# ---------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RssSampler:
    """Peak RSS above the level at entry, sampled from /proc/self/statm by a thread."""

    label = "peak RSS increase, sampled every 1 ms"

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)

    def _rss(self) -> int:
        return int(os.pread(self.fd, 256, 0).split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.base
        return False

    def close(self) -> None:
        os.close(self.fd)


class _MaxRssDelta:
    """Growth of the process's RSS high-water mark (where /proc is not available)."""

    label = "growth of the process's peak RSS (high-water mark)"
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere

    def __enter__(self):
        self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        self.bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) * self.unit
        return False

    def close(self) -> None:
        pass


class _CudaPeak:
    """torch.cuda.max_memory_allocated during the block minus what was allocated before it."""

    label = "peak CUDA memory allocated above the inputs (torch.cuda.max_memory_allocated)"

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        return False

    def close(self) -> None:
        pass


def _memory_meter(device: torch.device):
    if device.type == "cuda":
        return _CudaPeak(device)
    try:
        return _RssSampler()
    except (OSError, ValueError, AttributeError):
        return _MaxRssDelta()


@dataclass
class Method:
    name: str
    settings: str
    progress: str
    fn: Callable[[], torch.Tensor]


@dataclass
class Result:
    method: Method
    rel_error: float
    seconds: float
    peak_bytes: int


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64 (the absolute error when ref is all zeros)."""
    diff = (out.double() - ref.double()).norm()
    den = ref.double().norm()
    return float(diff / den) if den > 0 else float(diff)


def measure(fn, device, repeats, meter):
    """(output of the measured call, median seconds of `repeats` calls, peak bytes of that call).

    On the CPU the warm-up call is the one measured for memory (a second call would reuse heap
    pages the first one left behind and show less RSS growth); on CUDA a first untimed call does
    the one-time work (library workspaces, kernel selection) and the second is measured.
    """
    if device.type == "cuda":
        fn()
        _sync(device)
    with meter:
        out = fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), meter.bytes


def count_methods(args) -> int:
    """Rows of the table: dense, scatterbrain, performer, sparse only (those the settings allow)."""
    has_low_rank, has_sparse = args.features > 0, args.sparse != "none"
    return 1 + (has_low_rank and has_sparse) + has_low_rank + has_sparse


def build_methods(args, q, k, v) -> list[Method]:
    config = ScatterbrainConfig(
        num_features=args.features,
        sparse=args.sparse,
        bucket_size=args.bucket_size,
        n_hashes=args.n_hashes,
        window=args.window,
    )
    features, projections = draw_random_parameters(config, args.head_dim, generator=make_generator(args.seed))
    device = q.device
    features = None if features is None else features.to(device)
    projections = None if projections is None else projections.to(device)
    common = dict(is_causal=args.causal, backend="auto")
    m, c, r, w = args.features, args.bucket_size, args.n_hashes, args.window

    methods = [
        Method("dense", "sdpa", "dense (scaled_dot_product_attention)",
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)),
    ]
    if args.sparse == "lsh":
        sparse_settings, sparse_progress = f"c={c} R={r}", f"c={c}, R={r}"
        sparse_fn = lambda: lsh_attention(  # noqa: E731
            q, k, v, bucket_size=c, n_hashes=r, hash_projections=projections, **common
        )
    elif args.sparse == "local":
        sparse_settings, sparse_progress = f"w={w}", f"w={w}"
        sparse_fn = lambda: local_attention(q, k, v, window=w, **common)  # noqa: E731
    if m > 0 and args.sparse != "none":
        methods.append(Method(
            "scatterbrain", f"{args.sparse} {sparse_settings} + m={m}",
            f"scatterbrain ({args.sparse}, m={m}, {sparse_progress})",
            lambda: scatterbrain_attention(
                q, k, v, num_features=m, sparse=args.sparse, bucket_size=c, n_hashes=r, window=w,
                feature_matrix=features, hash_projections=projections, **common,
            ),
        ))
    if m > 0:
        methods.append(Method(
            "performer", f"m={m}", f"performer (m={m})",
            lambda: performer_attention(q, k, v, num_features=m, feature_matrix=features, **common),
        ))
    if args.sparse != "none":
        methods.append(Method(args.sparse, sparse_settings, f"{args.sparse} only ({sparse_progress})", sparse_fn))
    return methods


# ---------------------------------------------------------------- output


def _format_time(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def format_table(results: list[Result]) -> str:
    dense_time = results[0].seconds
    header = ("method", "settings", "rel. error", "time (ms)", "speedup vs dense", "peak mem (MiB)")
    rows = [
        (
            res.method.name,
            res.method.settings,
            f"{res.rel_error:.3e}",
            _format_time(res.seconds),
            f"{dense_time / res.seconds:.2f}x" if res.seconds > 0 else "-",
            f"{res.peak_bytes / 2**20:.1f}",
        )
        for res in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    left = (True, True, False, False, False, False)

    def line(cells):
        return "  ".join(
            cell.ljust(width) if is_left else cell.rjust(width) for cell, width, is_left in zip(cells, widths, left)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def describe_backend(query: torch.Tensor, is_causal: bool) -> str:
    """What backend='auto' runs for these inputs, and on CUDA why not the kernels."""
    backend = resolve_backend("auto", query, is_causal)
    if backend != "reference":
        return backend
    if query.device.type != "cuda":
        return "reference (pure PyTorch)"
    try:
        resolve_backend("triton", query, is_causal)
    except ValueError as exc:  # says why the kernels cannot take these inputs
        return f"reference (pure PyTorch; {exc})"
    return "reference (pure PyTorch)"


def _device_line(device: torch.device, dtype: str) -> str:
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    else:
        where = f"cpu ({torch.get_num_threads()} threads)"
    return f"device: {where} | torch {torch.__version__} | scatterattn {__version__} | dtype {dtype}"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    def progress(text, **kw):
        print(text, file=sys.stderr, flush=True, **kw)

    try:
        with torch.inference_mode():
            return _run(args, device, dtype, progress)
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_out_of_memory(exc):
            raise
        progress("")
        print(f"scatterattn: error: out of memory on {device.type} ({str(exc).splitlines()[0]}); "
              "try a smaller --seq-len, --heads or --batch", file=sys.stderr)
        return 1


def _is_out_of_memory(exc: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError (a RuntimeError) or torch's CPU allocator failure, which is a plain
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), not MemoryError."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _run(args, device, dtype, progress) -> int:
    shape = f"B={args.batch} H={args.heads} N={args.seq_len} D={args.head_dim}"
    total = 1 + count_methods(args)
    start = time.perf_counter()
    progress(f"[1/{total}] inputs ({shape}, {args.dtype}, {device.type}, seed {args.seed})...", end=" ")
    q, k, v = make_inputs(args.batch, args.heads, args.seq_len, args.head_dim,
                          seed=args.seed, dtype=dtype, device=device)
    methods = build_methods(args, q, k, v)
    assert len(methods) == total - 1
    backend = describe_backend(q, args.causal)
    progress(f"{time.perf_counter() - start:.1f} s")

    meter = _memory_meter(device)
    results: list[Result] = []
    ref = None
    try:
        for step, method in enumerate(methods, start=2):
            progress(f"[{step}/{total}] {method.progress}...", end=" ")
            start = time.perf_counter()
            out, seconds, peak = measure(method.fn, device, args.repeats, meter)
            if ref is None:  # the dense row comes first
                ref = out if dtype == torch.float32 else F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), is_causal=args.causal
                )
            results.append(Result(method, relative_error(out, ref), seconds, peak))
            del out
            progress(f"{time.perf_counter() - start:.1f} s")
    finally:
        meter.close()

    causal = "causal" if args.causal else "non-causal"
    print(f"scatterattn demo: {shape}, {args.dtype}, {causal}, {NUM_TOPICS}-topic synthetic q/k/v "
          f"(seed {args.seed}); error vs dense attention in float32")
    print(format_table(results))
    print(_device_line(device, args.dtype))
    print(f"scatterattn backend: auto -> {backend} | time: median of {args.repeats} "
          f"after 1 warm-up | peak mem: {meter.label}")
    return 0
