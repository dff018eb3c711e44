"""Approximation error vs softmax temperature: Performer, LSH-only and Scatterbrain at one budget.

The experiment of Chen et al., "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation"
(NeurIPS 2021): sparse (LSH) approximation should win when attention is peaked (low temperature),
low-rank (Performer) when it is flat (high temperature), and Scatterbrain (sparse + low-rank)
should do at least as well as the better of the two, and better than both in between.

Setup. Q, K, V have i.i.d. N(0, 1) entries, shape (1, H, N, D). The temperature T enters through the
softmax scale only: scale = 1 / (T * sqrt(D)), so the logits q.k * scale have standard deviation
about 1 / T (T = 1 is the usual 1/sqrt(D) scaling; T -> 0 is argmax attention, T -> inf uniform).
For each seed the same Q, K, V are used at every temperature; the random features and hash
projections are drawn from a seed derived from (but not equal to) the data seed.

Memory budget per query (equal for the three methods):
  Performer     m  random features                          (m = budget)
  LSH-only      c  keys in the query's bucket, 1 hash round (c = budget)
  Scatterbrain  m' features + c' bucket keys, 1 hash round  (m' + c' = budget; default half/half)

Metric: scatterattn.approximation_error -> attention_rel_error = ||A^ - A||_F / ||A||_F of the
implied (row-normalised) attention matrix against dense softmax (main metric, as in the paper) and
output_rel_error = ||O^ - O||_F / ||O||_F (secondary). Mean and sample std over seeds.
Note that these relative errors are not bounded by 1 or 2: for near-uniform attention LSH-only
puts weight 1/c on c keys instead of 1/S on S keys, whose error is sqrt(S/c - 1) (3.87 at S=1024,
c=64).

    python bench/temperature.py              # default run, writes bench/results/temperature.{md,png}
    python bench/temperature.py --quick      # tiny run, prints only (add --out-dir to write)
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import scatterattn

METHODS = ("performer", "lsh", "scatterbrain")
LABELS = {"performer": "Performer", "lsh": "LSH-only", "scatterbrain": "Scatterbrain"}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
METHOD_SEED_OFFSET = 1_000_003  # method randomness seed = data seed + this (independent streams)


def default_temperatures(count: int = 10, low: float = 1e-2, high: float = 1e2) -> list[float]:
    """`count` log-spaced temperatures from `low` (peaked) to `high` (flat)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count == 1:
        return [float(low)]
    a, b = math.log10(low), math.log10(high)
    return [10 ** (a + (b - a) * i / (count - 1)) for i in range(count)]


def budget_split(budget: int, sb_features: int | None = None) -> tuple[int, int]:
    """(m', c') for Scatterbrain: m' features + c' bucket keys = budget (default m' = budget // 2)."""
    if budget < 2:
        raise ValueError(f"budget must be >= 2 (Scatterbrain needs a feature and a key), got {budget}")
    m = budget // 2 if sb_features is None else int(sb_features)
    if not 1 <= m <= budget - 1:
        raise ValueError(f"sb_features must be in [1, budget - 1] = [1, {budget - 1}], got {m}")
    return m, budget - m


def method_settings(budget: int, sb_features: int | None = None) -> dict[str, dict]:
    """Keyword settings of each method at the same per-query budget."""
    m_sb, c_sb = budget_split(budget, sb_features)
    return {
        "performer": {"num_features": budget, "sparse": "none"},
        "lsh": {"num_features": 0, "sparse": "lsh", "bucket_size": budget, "n_hashes": 1},
        "scatterbrain": {"num_features": m_sb, "sparse": "lsh", "bucket_size": c_sb, "n_hashes": 1},
    }


def make_qkv(n: int, d: int, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    shape = (1, heads, n, d)
    q = torch.randn(shape, generator=gen)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    return q, k, v


def argmax_recall(q: torch.Tensor, k: torch.Tensor, settings: dict, seed: int) -> float:
    """Fraction of queries whose top-scoring key is in the exact (LSH) support. Temperature-free:
    the hash sees the unscaled q and k."""
    support = scatterattn.attention_support(q, k, seed=seed, **settings)
    top = (q @ k.transpose(-1, -2)).argmax(-1, keepdim=True)
    return float(support.gather(-1, top).float().mean())


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def run_sweep(
    n: int = 1024,
    d: int = 64,
    heads: int = 1,
    budget: int = 64,
    sb_features: int | None = None,
    seeds=(0, 1, 2),
    temperatures=None,
    out_dir=None,
    verbose: bool = False,
) -> list[dict]:
    """Run the sweep; return one dict per temperature (sorted from peaked to flat).

    Each dict: temperature, scale, and for each method in METHODS: `{method}_attn` / `{method}_attn_std`
    (attention_rel_error mean / std over seeds), `{method}_out` / `{method}_out_std`
    (output_rel_error), `{method}_attn_seeds` (per-seed list); `best` (method with the lowest mean
    attention error), `sb_beats_both` (Scatterbrain's mean below both baselines' means),
    `sb_wins_seeds` (seeds where it is below both), `n_seeds`, and the settings (n, d, heads,
    budget, sb_features, sb_bucket, lsh_recall, sb_recall: argmax recall of the supports).
    Writes temperature.md and temperature.png into `out_dir` only when out_dir is given.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("need at least one seed")
    temperatures = sorted(float(t) for t in (default_temperatures() if temperatures is None else temperatures))
    if not temperatures or any(not (math.isfinite(t) and t > 0) for t in temperatures):
        raise ValueError(f"temperatures must be positive and finite, got {temperatures}")
    if n * n > 1 << 22:
        raise ValueError(f"N*S = {n * n} > 2^22: approximation_error would not report attention_rel_error")
    settings = method_settings(budget, sb_features)
    m_sb, c_sb = budget_split(budget, sb_features)

    start = time.perf_counter()
    # errors[method][t_index] -> list over seeds of (attn, out)
    errors = {name: [[] for _ in temperatures] for name in METHODS}
    recall = {"lsh": [], "scatterbrain": []}
    for seed in seeds:
        q, k, v = make_qkv(n, d, heads, seed)
        method_seed = seed + METHOD_SEED_OFFSET
        for name in recall:
            recall[name].append(argmax_recall(q, k, settings[name], method_seed))
        for ti, temp in enumerate(temperatures):
            scale = 1.0 / (temp * math.sqrt(d))
            for name in METHODS:
                err = scatterattn.approximation_error(q, k, v, scale=scale, seed=method_seed, **settings[name])
                errors[name][ti].append((err["attention_rel_error"], err["output_rel_error"]))
            if verbose:
                print(
                    f"  seed {seed} T={temp:.3g}: "
                    + ", ".join(f"{LABELS[m]} {errors[m][ti][-1][0]:.4f}" for m in METHODS),
                    file=sys.stderr,
                )
    elapsed = time.perf_counter() - start

    rows = []
    for ti, temp in enumerate(temperatures):
        row = {
            "temperature": temp,
            "scale": 1.0 / (temp * math.sqrt(d)),
            "n": n,
            "d": d,
            "heads": heads,
            "budget": budget,
            "sb_features": m_sb,
            "sb_bucket": c_sb,
            "n_seeds": len(seeds),
            "lsh_recall": statistics.fmean(recall["lsh"]),
            "sb_recall": statistics.fmean(recall["scatterbrain"]),
            "elapsed_s": elapsed,
        }
        for name in METHODS:
            attn = [a for a, _ in errors[name][ti]]
            out = [o for _, o in errors[name][ti]]
            row[f"{name}_attn"], row[f"{name}_attn_std"] = _mean_std(attn)
            row[f"{name}_out"], row[f"{name}_out_std"] = _mean_std(out)
            row[f"{name}_attn_seeds"] = attn
        row["best"] = min(METHODS, key=lambda m: row[f"{m}_attn"])
        row["sb_beats_both"] = row["scatterbrain_attn"] < min(row["performer_attn"], row["lsh_attn"])
        row["sb_wins_seeds"] = sum(
            sb < min(p, l)
            for sb, p, l in zip(row["scatterbrain_attn_seeds"], row["performer_attn_seeds"], row["lsh_attn_seeds"])
        )
        rows.append(row)

    if out_dir is not None:
        write_outputs(rows, out_dir, seeds=seeds)
    return rows


# ----------------------------------------------------------------------------------------- output


def _fmt(mean: float, std: float, n_seeds: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n_seeds > 1 else f"{mean:.4f}"


def format_table(rows: list[dict], metric: str = "attn") -> str:
    """Markdown table of mean (± std) errors per temperature; metric 'attn' or 'out'."""
    last = "SB < both (seeds)" if metric == "attn" else "SB < both"
    head = ["T", "scale"] + [LABELS[m] for m in METHODS] + ["best", last]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['temperature']:.3g}", f"{r['scale']:.3g}"]
        best_metric = min(METHODS, key=lambda m: r[f"{m}_{metric}"])
        for m in METHODS:
            cell = _fmt(r[f"{m}_{metric}"], r[f"{m}_{metric}_std"], r["n_seeds"])
            cells.append(f"**{cell}**" if m == best_metric else cell)
        if metric == "attn":
            wins = f"{r['sb_wins_seeds']}/{r['n_seeds']}"
            cells += [LABELS[best_metric], ("yes" if r["sb_beats_both"] else "no") + f" ({wins})"]
        else:
            beats = r[f"scatterbrain_{metric}"] < min(r[f"performer_{metric}"], r[f"lsh_{metric}"])
            cells += [LABELS[best_metric], "yes" if beats else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(rows: list[dict]) -> str:
    """One honest sentence: where Scatterbrain beats both baselines (mean attention error), where not."""
    wins = [r for r in rows if r["sb_beats_both"]]
    losses = [r for r in rows if not r["sb_beats_both"]]

    def temps(rs):
        return ", ".join(f"{r['temperature']:.3g}" for r in rs)

    if not wins:
        text = "Scatterbrain beats BOTH baselines at no temperature in this sweep."
    else:
        text = f"Scatterbrain beats BOTH baselines (mean attention error) at T = {temps(wins)}"
        shaky = [r for r in wins if r["sb_wins_seeds"] < r["n_seeds"]]
        if shaky:
            text += f" (not on every seed at T = {temps(shaky)})"
        text += "."
    if losses:
        parts = []
        for m in ("performer", "lsh"):
            rs = [r for r in losses if r["best"] == m]
            if rs:
                parts.append(f"{LABELS[m]} is best at T = {temps(rs)}")
        text += " It does not win where " + "; ".join(parts) + "."
    useless = [r for r in rows if min(r[f"{m}_attn"] for m in METHODS) >= 1.0]
    if useless:
        text += f" At T = {temps(useless)} every method's error is >= 1 (no method approximates A usefully)."
    return text


def settings_text(rows: list[dict], seeds) -> str:
    r = rows[0]
    return "\n".join(
        [
            f"- Q, K, V: i.i.d. N(0, 1), shape (1, H={r['heads']}, N={r['n']}, D={r['d']}); S = N keys.",
            f"- Temperature T: scale = 1 / (T * sqrt(D)) passed as `scale=`; logits have std ~ 1/T. "
            f"{len(rows)} temperatures from {rows[0]['temperature']:.3g} to {rows[-1]['temperature']:.3g}.",
            f"- Budget per query = {r['budget']}: Performer m = {r['budget']} features; LSH-only c = "
            f"{r['budget']} keys (1 hash round); Scatterbrain m' = {r['sb_features']} features + "
            f"c' = {r['sb_bucket']} keys (1 round).",
            f"- Seeds: {list(seeds)} (data seed s; feature / hash seed s + {METHOD_SEED_OFFSET}); "
            f"mean ± sample std over {r['n_seeds']} seed(s).",
            "- Metric: `scatterattn.approximation_error` -> attention_rel_error "
            "||A^ - A||_F / ||A||_F (main), output_rel_error ||O^ - O||_F / ||O||_F (secondary).",
            f"- Argmax recall (queries whose top key lands in the exact support; temperature-free): "
            f"LSH-only {r['lsh_recall']:.3f} (random buckets: {min(1.0, r['budget'] / r['n']):.3f}), "
            f"Scatterbrain {r['sb_recall']:.3f} (random: {min(1.0, r['sb_bucket'] / r['n']):.3f}).",
            f"- Flat-limit reference: LSH-only error -> sqrt(S/c - 1) = "
            f"{math.sqrt(max(0.0, r['n'] / r['budget'] - 1)):.3f} as T -> inf; "
            f"sqrt(2) = 1.414 is the error of missing a one-hot row entirely (T -> 0).",
        ]
    )


def format_markdown(rows: list[dict], seeds) -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join(
        [
            "# Approximation error vs softmax temperature (Scatterbrain, Chen et al. 2021)",
            "",
            f"CPU reference (scatterattn {scatterattn.__version__}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads), {date}; sweep took {rows[0]['elapsed_s']:.1f} s.",
            "Generated by `python bench/temperature.py`.",
            "",
            "## Settings",
            "",
            settings_text(rows, seeds),
            "",
            "## Attention-matrix relative error (main metric; bold = best mean)",
            "",
            format_table(rows, "attn"),
            "",
            "## Output relative error (secondary)",
            "",
            format_table(rows, "out"),
            "",
            "## Summary",
            "",
            summary_line(rows),
            "",
        ]
    )


def write_plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG", file=sys.stderr)
        return False
    temps = [r["temperature"] for r in rows]
    r0 = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles = {"performer": ("tab:blue", "o"), "lsh": ("tab:orange", "s"), "scatterbrain": ("tab:green", "^")}
    labels = {
        "performer": f"Performer (m={r0['budget']})",
        "lsh": f"LSH-only (c={r0['budget']})",
        "scatterbrain": f"Scatterbrain (m'={r0['sb_features']}, c'={r0['sb_bucket']})",
    }
    for ax, metric, title in (
        (axes[0], "attn", "attention matrix: ||A^ - A||_F / ||A||_F"),
        (axes[1], "out", "output: ||O^ - O||_F / ||O||_F"),
    ):
        for m in METHODS:
            color, marker = styles[m]
            mean = [r[f"{m}_{metric}"] for r in rows]
            std = [r[f"{m}_{metric}_std"] for r in rows]
            ax.plot(temps, mean, marker=marker, color=color, label=labels[m])
            if r0["n_seeds"] > 1:
                lo = [max(a - s, 1e-6) for a, s in zip(mean, std)]
                hi = [a + s for a, s in zip(mean, std)]
                ax.fill_between(temps, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.axhline(math.sqrt(2), color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("softmax temperature T   (peaked <-  ->  flat)")
        ax.set_ylabel("relative error (mean over seeds)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle(
        f"Error vs temperature at equal budget {r0['budget']}/query  "
        f"(N={r0['n']}, D={r0['d']}, H={r0['heads']}, {r0['n_seeds']} seeds; scale = 1/(T sqrt(D)); "
        f"dotted: sqrt(2))",
        fontsize=11,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out_dir, seeds) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / "temperature.md"
    md_path.write_text(format_markdown(rows, seeds))
    written = {"md": md_path}
    png_path = out_dir / "temperature.png"
    if write_plot(rows, png_path):
        written["png"] = png_path
    return written


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="sequence length N = S (default 1024; quick 128)")
    p.add_argument("--d", type=int, default=None, help="head dim D (default 64; quick 16)")
    p.add_argument("--heads", type=int, default=1, help="heads H (default 1)")
    p.add_argument("--budget", type=int, default=None, help="memory per query (default 64; quick 32)")
    p.add_argument("--sb-features", type=int, default=None, help="Scatterbrain features m' (default budget//2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick 0 1)")
    p.add_argument("--temperatures", type=float, nargs="+", default=None, help="explicit temperatures")
    p.add_argument("--t-min", type=float, default=1e-2, help="lowest temperature (default 0.01)")
    p.add_argument("--t-max", type=float, default=1e2, help="highest temperature (default 100)")
    p.add_argument("--num-t", type=int, default=None, help="number of temperatures (default 10; quick 5)")
    p.add_argument("--quick", action="store_true", help="tiny run (N=128, D=16, budget 32); prints only")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write (default {DEFAULT_OUT_DIR})")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--verbose", action="store_true", help="per-seed progress on stderr")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    quick = args.quick
    n = args.n if args.n is not None else (128 if quick else 1024)
    d = args.d if args.d is not None else (16 if quick else 64)
    budget = args.budget if args.budget is not None else (32 if quick else 64)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if quick else [0, 1, 2])
    num_t = args.num_t if args.num_t is not None else (5 if quick else 10)
    temps = args.temperatures if args.temperatures is not None else default_temperatures(num_t, args.t_min, args.t_max)
    if args.no_write:
        out_dir = None
    elif args.out_dir is not None:
        out_dir = args.out_dir
    else:
        out_dir = None if quick else DEFAULT_OUT_DIR  # a quick run never overwrites the real results

    rows = run_sweep(
        n=n, d=d, heads=args.heads, budget=budget, sb_features=args.sb_features,
        seeds=seeds, temperatures=temps, out_dir=None, verbose=args.verbose,
    )
    written = write_outputs(rows, out_dir, seeds) if out_dir is not None else {}
    print(f"CPU reference, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sweep took {rows[0]['elapsed_s']:.1f} s")
    print(settings_text(rows, seeds))
    print()
    print("Attention-matrix relative error (main):")
    print(format_table(rows, "attn"))
    print()
    print("Output relative error (secondary):")
    print(format_table(rows, "out"))
    print()
    print(summary_line(rows))
    if written:
        print("wrote " + " and ".join(str(path) for path in written.values()))
    return rows


if __name__ == "__main__":
    main()
