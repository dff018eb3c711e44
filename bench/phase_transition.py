"""Phase transition of the chained low-rank attention gradient: error against the logit range.

`scatterattn.chained_lowrank_attention` has an exact forward and a chained low-rank (FAVOR+ random
feature) backward. Its error is small when logits are bounded and blows up beyond a "phase
transition" (Alman & Song 2023; Hu et al. 2025); the package falls back to the exact backward per
(batch, kv head) group when the logit bound tau * max|q| * max|k| (`scatterattn.lora.logit_bound`)
exceeds `threshold` (default `scatterattn.lora.DEFAULT_THRESHOLD`). This sweep measures where the
transition is, to judge that default.

Setup. Q, K, V, dO with i.i.d. N(0, 1) entries, float64 on the CPU, shape (B, H, N, D); Q and K are
multiplied by gamma, chosen per data seed so that the largest per-group logit bound equals each
target value exactly (targets log-spaced, default 0.1 .. 30). tau = 1/sqrt(D). threshold=None, so no
group falls back: every number below is the approximate backward. For each target, each m (number of
random features) and each seed: dq, dk, dv of the chained backward against exact autograd through
`scatterattn.dense_attention` (relative Frobenius error ||g~ - g||_F / ||g||_F and cosine similarity
of the flattened tensors), averaged over seeds (data and feature matrix both change with the seed).
The actual max_ij |s_ij| = tau |q_i . k_j| is measured densely and reported next to the bound.

    python bench/phase_transition.py            # default (< 2 min on 2 CPUs), writes bench/results/
    python bench/phase_transition.py --quick    # ~10 s, prints only (add --out-dir to write)
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import scatterattn
from scatterattn import lora

GRADS = ("dq", "dk", "dv")
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
FEATURE_SEED_OFFSET = 1_000_003  # feature-matrix seed = data seed + this
LEVELS = (0.1, 0.2, 0.3, 1.0)  # error levels whose first crossing is reported


def git_commit() -> str:
    """Short commit of the repository (with '+dirty' when scatterattn/ has local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "scatterattn"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def log_space(low: float, high: float, count: int) -> list[float]:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"need 0 < low <= high < inf, got {low}, {high}")
    if count == 1:
        return [float(low)]
    a, b = math.log10(low), math.log10(high)
    return [10 ** (a + (b - a) * i / (count - 1)) for i in range(count)]


def make_data(batch: int, heads: int, n: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(int(seed))
    shape = (batch, heads, n, d)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))  # q, k, v, dO


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), do)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _mean_std(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_sweep(
    n: int = 512,
    d: int = 64,
    heads: int = 4,
    batch: int = 1,
    features=(256, 64),
    bounds=None,
    seeds=(0, 1, 2),
    is_causal: bool = False,
    out_dir=None,
    verbose: bool = False,
) -> list[dict]:
    """One dict per (target logit bound, m), sorted by m then bound.

    Keys: bound (target = measured max per-group `logit_bound`), bound_median (median over groups),
    smax (dense max |s_ij|, mean over seeds), gamma (mean), m, and for g in dq, dk, dv: `{g}_err`,
    `{g}_err_std`, `{g}_cos`, `{g}_cos_std` (over seeds); worst_err = max of the three mean errors,
    min_cos; numeric_fallback / groups (groups the package computed exactly although threshold=None,
    because its factors underflowed, summed over seeds); settings (n, d, heads, batch, n_seeds, is_causal,
    elapsed_s). Writes
    phase_transition.{md,png} into out_dir only when out_dir is given.
    """
    seeds = [int(s) for s in seeds]
    features = sorted({int(m) for m in features}, reverse=True)
    if not seeds or not features:
        raise ValueError("need at least one seed and one feature count")
    bounds = sorted(float(b) for b in (log_space(0.1, 30.0, 13) if bounds is None else bounds))
    if not bounds or any(not (math.isfinite(b) and b > 0) for b in bounds):
        raise ValueError(f"bounds must be positive and finite, got {bounds}")
    scale = d ** -0.5
    start = time.perf_counter()
    acc = {(b, m): {"err": {g: [] for g in GRADS}, "cos": {g: [] for g in GRADS}, "numeric": 0, "groups": 0}
           for b in bounds for m in features}
    geo = {b: {"smax": [], "gamma": [], "median": [], "max": []} for b in bounds}
    for seed in seeds:
        q0, k0, v, do = make_data(batch, heads, n, d, seed)
        base = float(lora.logit_bound(q0, k0, scale).max())
        for b in bounds:
            gamma = math.sqrt(b / base)  # the bound is quadratic in gamma
            q, k = q0 * gamma, k0 * gamma
            per_group = lora.logit_bound(q, k, scale)
            s = (q @ k.transpose(-1, -2)) * scale
            if is_causal:
                s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
            geo[b]["smax"].append(float(s.abs().max()))
            geo[b]["gamma"].append(gamma)
            geo[b]["median"].append(float(per_group.median()))
            geo[b]["max"].append(float(per_group.max()))
            exact = _grads(lambda q_, k_, v_: scatterattn.dense_attention(q_, k_, v_, is_causal=is_causal), q, k, v, do)
            for m in features:
                stats = lora.ChainedGradientStats()
                approx = _grads(
                    lambda q_, k_, v_: scatterattn.chained_lowrank_attention(
                        q_, k_, v_, is_causal=is_causal, num_features=m, threshold=None,
                        seed=seed + FEATURE_SEED_OFFSET, stats=stats,
                    ),
                    q, k, v, do,
                )
                # threshold=None: only a numeric fallback (underflowing factors) can make a group exact
                acc[(b, m)]["numeric"] += stats.fallback
                acc[(b, m)]["groups"] += stats.approximate + stats.fallback
                for g, a, e in zip(GRADS, approx, exact):
                    acc[(b, m)]["err"][g].append(_rel(a, e))
                    acc[(b, m)]["cos"][g].append(_cos(a, e))
                if verbose:
                    errs = ", ".join(f"{g} {acc[(b, m)]['err'][g][-1]:.3f}" for g in GRADS)
                    print(f"  seed {seed} bound {b:.3g} m {m}: {errs}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start

    rows = []
    for m in features:
        for b in bounds:
            row = {
                "bound": statistics.fmean(geo[b]["max"]),
                "target": b,
                "bound_median": statistics.fmean(geo[b]["median"]),
                "smax": statistics.fmean(geo[b]["smax"]),
                "gamma": statistics.fmean(geo[b]["gamma"]),
                "m": m,
                "n": n, "d": d, "heads": heads, "batch": batch, "n_seeds": len(seeds),
                "is_causal": is_causal, "elapsed_s": elapsed,
            }
            for g in GRADS:
                row[f"{g}_err"], row[f"{g}_err_std"] = _mean_std(acc[(b, m)]["err"][g])
                row[f"{g}_cos"], row[f"{g}_cos_std"] = _mean_std(acc[(b, m)]["cos"][g])
            row["numeric_fallback"] = acc[(b, m)]["numeric"]
            row["groups"] = acc[(b, m)]["groups"]
            row["worst_err"] = max(row[f"{g}_err"] for g in GRADS)
            row["min_cos"] = min(row[f"{g}_cos"] for g in GRADS)
            rows.append(row)
    if out_dir is not None:
        write_outputs(rows, out_dir, seeds)
    return rows


# ------------------------------------------------------------------------------------------ analysis


def crossing(rows: list[dict], m: int, level: float, key: str = "worst_err"):
    """Logit bound where `key` (mean over seeds) first reaches `level` at m features, interpolated
    linearly in (log bound, log error). Returns (value, kind): kind 'at' (interpolated), 'below'
    (already above the level at the smallest bound: value = smallest bound) or 'above' (never
    reached: value = largest bound)."""
    pts = [(r["bound"], r[key]) for r in rows if r["m"] == m]
    if not pts:
        raise ValueError(f"no rows for m={m}")
    if pts[0][1] >= level:
        return pts[0][0], "below"
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if e1 >= level:
            t = (math.log(level) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))), "at"
    return pts[-1][0], "above"


def error_at(rows: list[dict], m: int, bound: float, key: str = "worst_err") -> float | None:
    """`key` at a logit bound, interpolated in (log bound, log error); None outside the sweep."""
    pts = [(r["bound"], r[key]) for r in rows if r["m"] == m]
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if b0 <= bound <= b1:
            t = (math.log(bound) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    return None


def _fmt_crossing(value_kind) -> str:
    value, kind = value_kind
    return {"at": f"{value:.3g}", "below": f"< {value:.3g}", "above": f"> {value:.3g}"}[kind]


def summary_lines(rows: list[dict]) -> list[str]:
    ms = sorted({r["m"] for r in rows}, reverse=True)
    thr = lora.DEFAULT_THRESHOLD
    lines = []
    for m in ms:
        cross = {lvl: crossing(rows, m, lvl) for lvl in LEVELS}
        at_thr = error_at(rows, m, thr)
        worst = max((r for r in rows if r["m"] == m), key=lambda r: r["worst_err"])
        text = (f"m = {m}: the worst of dq/dk/dv reaches 10% error at logit bound {_fmt_crossing(cross[0.1])}, "
                f"20% at {_fmt_crossing(cross[0.2])}, 30% at {_fmt_crossing(cross[0.3])}, "
                f"100% at {_fmt_crossing(cross[1.0])}")
        if at_thr is not None:
            text += f"; at the default threshold {thr:g} it is {100 * at_thr:.0f}%"
        text += f"; peak {100 * worst['worst_err']:.0f}% at bound {worst['bound']:.3g}."
        cos = {}
        for level in (0.9, 0.5):
            below = [r for r in rows if r["m"] == m and r["min_cos"] < level]
            cos[level] = f"{below[0]['bound']:.3g}" if below else f"> {rows[-1]['bound']:.3g}"
        text += (f" The smallest cosine similarity drops below 0.9 from bound {cos[0.9]} and below 0.5 from "
                 f"{cos[0.5]} (first sweep point)")
        if worst["bound"] < max(r["bound"] for r in rows if r["m"] == m):
            text += "; the relative error falling again past its peak is no recovery: the cosine keeps falling"
        lines.append(text + ".")
    if len(ms) >= 2:
        hi, lo = ms[0], ms[-1]
        small = [r for r in rows if r["m"] == hi][0]
        small_lo = [r for r in rows if r["m"] == lo][0]
        ratio = small_lo["worst_err"] / small["worst_err"]
        lines.append(
            f"At the smallest bound ({small['bound']:.3g}) the error ratio m={lo} / m={hi} is {ratio:.2f} "
            f"(1/sqrt(m) scaling predicts {math.sqrt(hi / lo):.2f})."
        )
    if any(r["m"] == 256 for r in rows) or ms:
        m_ref = 256 if any(r["m"] == 256 for r in rows) else ms[0]
        value, kind = crossing(rows, m_ref, 0.2)
        if kind == "at":
            verdict = "too high" if value < thr * 0.9 else ("about right" if value <= thr * 1.1 else "conservative")
            lines.append(
                f"Threshold: <= 20% worst-gradient error at m = {m_ref} needs logit bound <= {value:.2g} "
                f"(interpolated); the default {thr:g} is {verdict} for this data "
                f"(i.i.d. Gaussian Q, K, where the bound is {rows[0]['bound'] / rows[0]['smax']:.1f}x the actual max |s_ij|)."
            )
        else:
            lines.append(f"Threshold: the 20% level at m = {m_ref} is {_fmt_crossing((value, kind))} in this sweep.")
    return lines


# -------------------------------------------------------------------------------------------- output


def format_table(rows: list[dict], m: int) -> str:
    head = ["logit bound", "median group bound", "max abs s_ij", "gamma",
            "dq err", "dk err", "dv err", "dq cos", "dk cos", "dv cos"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    multi = rows[0]["n_seeds"] > 1
    for r in rows:
        if r["m"] != m:
            continue
        cells = [f"{r['bound']:.3g}", f"{r['bound_median']:.3g}", f"{r['smax']:.3g}", f"{r['gamma']:.3g}"]
        for g in GRADS:
            cells.append(f"{r[f'{g}_err']:.4f}" + (f" ± {r[f'{g}_err_std']:.4f}" if multi else ""))
        for g in GRADS:
            cells.append(f"{r[f'{g}_cos']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossing_table(rows: list[dict]) -> str:
    ms = sorted({r["m"] for r in rows}, reverse=True)
    head = ["m", "gradient"] + [f"{int(100 * lvl)}% error at bound" for lvl in LEVELS] + [
        f"error at bound {lora.DEFAULT_THRESHOLD:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ms:
        for key, name in [(f"{g}_err", g) for g in GRADS] + [("worst_err", "worst")]:
            at = error_at(rows, m, lora.DEFAULT_THRESHOLD, key)
            cells = [str(m), name] + [_fmt_crossing(crossing(rows, m, lvl, key)) for lvl in LEVELS]
            cells.append("n/a" if at is None else f"{at:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_text(rows: list[dict], seeds) -> str:
    r = rows[0]
    bounds = sorted({x["bound"] for x in rows})
    return "\n".join([
        f"- Q, K, V, dO: i.i.d. N(0, 1), float64, shape (B={r['batch']}, H={r['heads']}, N={r['n']}, D={r['d']}); "
        f"{'causal' if r['is_causal'] else 'non-causal'}; tau = 1/sqrt(D).",
        f"- Q and K scaled by gamma so that max over (batch, head) groups of `logit_bound` = tau max|q| max|k| "
        f"equals each of {len(bounds)} log-spaced targets from {bounds[0]:.3g} to {bounds[-1]:.3g}.",
        f"- Random features m = {sorted({x['m'] for x in rows}, reverse=True)} (positive / FAVOR+, orthogonal), "
        f"threshold=None (no fallback), factors='random'.",
        f"- Seeds {list(seeds)}: data seed s, feature seed s + {FEATURE_SEED_OFFSET}; mean ± sample std over "
        f"{r['n_seeds']} seed(s).",
        "- Metrics: relative Frobenius error ||g~ - g||_F / ||g||_F and cosine similarity against exact autograd "
        "through `scatterattn.dense_attention`, g in dq, dk, dv; 'worst' = max of the three mean errors.",
        f"- Numeric fallbacks (groups the package computed exactly despite threshold=None because the factors "
        f"underflowed): {sum(x['numeric_fallback'] for x in rows)} of {sum(x['groups'] for x in rows)} groups "
        f"over the whole sweep" + ("" if not any(x["numeric_fallback"] for x in rows) else
                                   " -- rows with numeric fallbacks understate the error of the approximation"),
        f"- scatterattn commit {git_commit()}.",
    ])


def format_markdown(rows: list[dict], seeds) -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    ms = sorted({r["m"] for r in rows}, reverse=True)
    parts = [
        "# Chained low-rank gradient: error vs logit range (phase transition)",
        "",
        f"CPU, float64 (scatterattn {scatterattn.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {date}; sweep took {rows[0]['elapsed_s']:.1f} s.",
        "Generated by `python bench/phase_transition.py`.",
        "",
        "## Settings",
        "",
        settings_text(rows, seeds),
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary_lines(rows)],
        "",
        f"## Where the error crosses each level (package default threshold = {lora.DEFAULT_THRESHOLD:g})",
        "",
        "Logit bound at which the mean error first reaches the level, interpolated in log-log between sweep "
        "points ('<' / '>': outside the sweep).",
        "",
        crossing_table(rows),
        "",
    ]
    for m in ms:
        parts += [f"## m = {m}", "", format_table(rows, m), ""]
    return "\n".join(parts)


def write_plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG", file=sys.stderr)
        return False
    ms = sorted({r["m"] for r in rows}, reverse=True)
    colors = {"dq": "tab:blue", "dk": "tab:orange", "dv": "tab:green"}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    r0 = rows[0]
    for mi, m in enumerate(ms):
        rs = [r for r in rows if r["m"] == m]
        x = [r["bound"] for r in rs]
        for g in GRADS:
            axes[0].plot(x, [r[f"{g}_err"] for r in rs], styles[mi % len(styles)], marker="o", markersize=3,
                         color=colors[g], label=f"{g}, m={m}")
            axes[1].plot(x, [r[f"{g}_cos"] for r in rs], styles[mi % len(styles)], marker="o", markersize=3,
                         color=colors[g], label=f"{g}, m={m}")
    for ax in axes:
        ax.axvline(lora.DEFAULT_THRESHOLD, color="black", linewidth=1.2, alpha=0.7,
                   label=f"DEFAULT_THRESHOLD = {lora.DEFAULT_THRESHOLD:g}")
        ax.set_xscale("log")
        ax.set_xlabel("logit bound  tau max|q| max|k|  (max over groups)")
        ax.grid(True, which="both", alpha=0.3)
    for level in (0.1, 0.3, 1.0):
        axes[0].axhline(level, color="grey", linestyle=":", linewidth=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative error ||g~ - g||_F / ||g||_F\n(mean over seeds; dotted: 10%, 30%, 100%)")
    axes[1].set_ylabel("cosine similarity with exact gradient")
    axes[1].set_title("cosine similarity", fontsize=10)
    axes[0].legend(fontsize=8, ncol=2)
    # secondary x axis: the dense max |s_ij| (roughly proportional to the bound)
    ratio = statistics.fmean(r["smax"] / r["bound"] for r in rows)
    sec = axes[0].secondary_xaxis("top", functions=(lambda b: b * ratio, lambda s: s / ratio))
    sec.set_xlabel(f"~ actual max |s_ij| (mean ratio {ratio:.2f} x bound)", fontsize=8)
    fig.suptitle(
        f"Chained low-rank backward vs exact autograd (B={r0['batch']}, H={r0['heads']}, N={r0['n']}, D={r0['d']}, "
        f"float64, {'causal' if r0['is_causal'] else 'non-causal'}, {r0['n_seeds']} seeds, threshold=None)",
        fontsize=11,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out_dir, seeds) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / "phase_transition.md"
    md_path.write_text(format_markdown(rows, seeds))
    written = {"md": md_path}
    png_path = out_dir / "phase_transition.png"
    if write_plot(rows, png_path):
        written["png"] = png_path
    return written


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="sequence length (default 512; quick 256)")
    p.add_argument("--d", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--heads", type=int, default=None, help="heads (default 4; quick 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--features", type=int, nargs="+", default=[256, 64], help="values of m (default 256 64)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick 0 1)")
    p.add_argument("--bounds", type=float, nargs="+", default=None, help="explicit logit-bound targets")
    p.add_argument("--bound-min", type=float, default=0.1)
    p.add_argument("--bound-max", type=float, default=30.0)
    p.add_argument("--num-bounds", type=int, default=None, help="number of targets (default 13; quick 6)")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--quick", action="store_true", help="small run (~10 s); prints only unless --out-dir")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write (default {DEFAULT_OUT_DIR})")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    quick = args.quick
    n = args.n if args.n is not None else (256 if quick else 512)
    heads = args.heads if args.heads is not None else (2 if quick else 4)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if quick else [0, 1, 2])
    num = args.num_bounds if args.num_bounds is not None else (6 if quick else 13)
    bounds = args.bounds if args.bounds is not None else log_space(args.bound_min, args.bound_max, num)
    if args.no_write:
        out_dir = None
    elif args.out_dir is not None:
        out_dir = args.out_dir
    else:
        out_dir = None if quick else DEFAULT_OUT_DIR
    rows = run_sweep(n=n, d=args.d, heads=heads, batch=args.batch, features=args.features, bounds=bounds,
                     seeds=seeds, is_causal=args.causal, out_dir=None, verbose=args.verbose)
    written = write_outputs(rows, out_dir, seeds) if out_dir is not None else {}
    print(f"CPU float64, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sweep took {rows[0]['elapsed_s']:.1f} s")
    print(settings_text(rows, seeds))
    print()
    for line in summary_lines(rows):
        print(line)
    print()
    print(crossing_table(rows))
    for m in sorted({r["m"] for r in rows}, reverse=True):
        print(f"\nm = {m}")
        print(format_table(rows, m))
    if written:
        print("wrote " + " and ".join(str(p) for p in written.values()))
    return rows


if __name__ == "__main__":
    main()
