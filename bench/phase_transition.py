"""Phase transition of the chained low-rank attention gradient: error against the logit range.

`scatterattn.chained_lowrank_attention` has an exact forward and a chained low-rank (FAVOR+ random
feature) backward. Its error is small when logits are bounded and blows up beyond a "phase
transition" (Alman & Song 2023; Hu et al. 2025); the package falls back to the exact backward per
(batch, kv head) group when the logit bound tau * max|q| * max|k| (`scatterattn.lora.logit_bound`)
exceeds `threshold` (default `scatterattn.lora.DEFAULT_THRESHOLD`). This sweep measures where the
transition is, to judge that default, and whether the sparse-corrected chain (Scatterbrain's
attention matrix: exact exp(s) on an LSH or local support, random features elsewhere) moves it.

Setup. Two data distributions (`--data`), float64 on the CPU, shape (B, H, N, D):
  * gaussian: Q, K, V, dO with i.i.d. N(0, 1) entries;
  * clustered: per (batch, head) C = N / 32 centres ~ N(0, I); every query and every key is a
    uniformly drawn centre + 0.3 N(0, I) (queries and keys share the centres, so the large logits
    are the same-cluster pairs, which LSH should find); V, dO i.i.d. N(0, 1).
Q and K are multiplied by gamma, chosen per data seed so that the largest per-group logit bound
equals each target value exactly (targets log-spaced, default 0.1 .. 30). tau = 1/sqrt(D). Methods
(`--methods`), all with the same data and the same feature matrix per seed:
  * plain: threshold=None, every group takes the plain chain (rank-m random features);
  * sparse-lsh: threshold=0, sparse='lsh', bucket_size=W (default N/8), n_hashes=1;
  * sparse-local: threshold=0, sparse='local', window=W (keys |i - j| <= W/2).
No group falls back (except numerically, counted): every number is an approximate backward. For
each target, method, m (number of random features) and seed: dq, dk, dv against exact autograd
through `scatterattn.dense_attention` (relative Frobenius error ||g~ - g||_F / ||g||_F and cosine
similarity of the flattened tensors), averaged over seeds (data, feature matrix and hash projections
all change with the seed). Check of the attention matrix: dv = f~^T dO is linear in f~, so the
chain's dv must equal autograd's dv through `scatterattn.scatterbrain_attention` with the same
settings and seed (sparse='none' for plain: Performer); the largest relative difference is reported.
The actual max_ij |s_ij| = tau |q_i . k_j| is measured densely and reported next to the bound.

The sparse methods run at every other target by default (`--sparse-every 1`: all), to fit the time.

    python bench/phase_transition.py            # default (~3 min on 2 idle CPUs), writes bench/results/
    python bench/phase_transition.py --quick    # ~15 s, prints only (add --out-dir to write)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402

import scatterattn
from scatterattn import lora

GRADS = ("dq", "dk", "dv")
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
FEATURE_SEED_OFFSET = 1_000_003  # feature-matrix (then hash-projection) seed = data seed + this
LEVELS = (0.1, 0.2, 0.3, 1.0)  # error levels whose first crossing is reported
DATA = ("gaussian", "clustered")
METHODS = ("plain", "sparse-lsh", "sparse-local")
CLUSTER_DIV = 32  # clustered data: C = N / CLUSTER_DIV centres
CLUSTER_SPREAD = 0.3  # point = centre + CLUSTER_SPREAD * N(0, I)
CHECK_TOL = 1e-6  # dv against Scatterbrain's f~^T dO: above this the chain's f~ is not Scatterbrain's




def log_space(low: float, high: float, count: int) -> list[float]:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"need 0 < low <= high < inf, got {low}, {high}")
    if count == 1:
        return [float(low)]
    a, b = math.log10(low), math.log10(high)
    return [10 ** (a + (b - a) * i / (count - 1)) for i in range(count)]


def make_data(batch: int, heads: int, n: int, d: int, seed: int, kind: str = "gaussian"):
    """q, k, v, dO (B, H, N, D) float64. kind 'gaussian': i.i.d. N(0, 1); 'clustered': q and k are
    centre + CLUSTER_SPREAD * N(0, I) around N / CLUSTER_DIV shared N(0, I) centres per (batch, head),
    each point's centre drawn uniformly; v, dO i.i.d. N(0, 1)."""
    gen = torch.Generator().manual_seed(int(seed))
    shape = (batch, heads, n, d)

    def randn(*size):
        return torch.randn(size, generator=gen, dtype=torch.float64)

    if kind == "gaussian":
        return tuple(randn(*shape) for _ in range(4))
    if kind != "clustered":
        raise ValueError(f"data kind must be one of {DATA}, got {kind!r}")
    n_centres = max(1, n // CLUSTER_DIV)
    centres = randn(batch, heads, n_centres, d)

    def around():
        idx = torch.randint(n_centres, (batch, heads, n), generator=gen)
        return centres.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d)) + CLUSTER_SPREAD * randn(*shape)

    q, k = around(), around()
    return q, k, randn(*shape), randn(*shape)


def method_kwargs(method: str, width: int) -> tuple[dict, dict]:
    """(kwargs of chained_lowrank_attention, kwargs of scatterbrain_attention with the same f~)."""
    if method == "plain":
        return dict(threshold=None), dict(sparse="none")
    if method == "sparse-lsh":
        sparse = dict(sparse="lsh", bucket_size=width, n_hashes=1)
    elif method == "sparse-local":
        sparse = dict(sparse="local", window=width)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return dict(threshold=0, **sparse), dict(sparse)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), do)


def _dv(fn, v, do):
    v = v.detach().clone().requires_grad_()
    return torch.autograd.grad(fn(v), v, do)[0]


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
    data=DATA,
    methods=METHODS,
    width: int | None = None,
    sparse_features=None,
    sparse_bounds=None,
    out_dir=None,
    verbose: bool = False,
) -> list[dict]:
    """One dict per (data, method, m, target logit bound), sorted in that order (m descending).

    width: LSH bucket size and local window of the sparse methods (default n // 8); sparse_features,
    sparse_bounds: the values of m and the targets (a subset of `bounds`) of the sparse methods
    (default: all of `features`, all of `bounds`).
    Keys: data, method, width, bound (target = measured max per-group `logit_bound`), bound_median
    (median over groups), smax (dense max |s_ij|, mean over seeds), gamma (mean), m, and for g in dq,
    dk, dv: `{g}_err`, `{g}_err_std`, `{g}_cos`, `{g}_cos_std` (over seeds); worst_err = max of the
    three mean errors, min_cos; numeric_fallback / sparse_groups / groups (groups the package computed
    exactly because its factors underflowed / groups that took the sparse-corrected chain / all
    groups, summed over seeds); support_mass (sparse methods: mean over rows and seeds of the exact
    attention mass on the sparse support; None for plain); check (max over seeds of
    ||dv - dv_sb|| / ||dv_sb||, dv_sb from autograd through `scatterbrain_attention` with the same f~);
    settings (n, d, heads, batch, n_seeds, is_causal, elapsed_s, load_avg: the 5-minute load average
    at the end). Writes phase_transition.{md,json,png} into out_dir only when out_dir is given.
    """
    seeds = [int(s) for s in seeds]
    features = sorted({int(m) for m in features}, reverse=True)
    sparse_features = features if sparse_features is None else sorted({int(m) for m in sparse_features}, reverse=True)
    data, methods = list(data), list(methods)
    if not seeds or not features or not sparse_features or not data or not methods:
        raise ValueError("need at least one seed, feature count, data kind and method")
    for kind in data:
        if kind not in DATA:
            raise ValueError(f"data kind must be one of {DATA}, got {kind!r}")
    for method in methods:
        method_kwargs(method, 1)  # validates the name
    width = max(1, n // 8) if width is None else int(width)
    bounds = sorted(float(b) for b in (log_space(0.1, 30.0, 13) if bounds is None else bounds))
    if not bounds or any(not (math.isfinite(b) and b > 0) for b in bounds):
        raise ValueError(f"bounds must be positive and finite, got {bounds}")
    sparse_bounds = set(bounds) if sparse_bounds is None else {float(b) for b in sparse_bounds}
    if not sparse_bounds or not sparse_bounds <= set(bounds):
        raise ValueError(f"sparse_bounds must be a non-empty subset of bounds, got {sorted(sparse_bounds)}")
    series = [(kind, method, m) for kind in data for method in methods
              for m in (features if method == "plain" else sparse_features)]
    points = [(s, b) for s in series for b in bounds if s[1] == "plain" or b in sparse_bounds]
    scale = d ** -0.5
    start = time.perf_counter()
    acc = {point: {"err": {g: [] for g in GRADS}, "cos": {g: [] for g in GRADS}, "numeric": 0, "sparse": 0,
                   "groups": 0, "check": [], "mass": []} for point in points}
    geo = {(kind, b): {"smax": [], "gamma": [], "median": [], "max": []} for kind in data for b in bounds}
    for kind in data:
        for seed in seeds:
            q0, k0, v, do = make_data(batch, heads, n, d, seed, kind)
            base = float(lora.logit_bound(q0, k0, scale).max())
            for b in bounds:
                gamma = math.sqrt(b / base)  # the bound is quadratic in gamma
                q, k = q0 * gamma, k0 * gamma
                per_group = lora.logit_bound(q, k, scale)
                s = (q @ k.transpose(-1, -2)) * scale
                if is_causal:
                    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
                g_ = geo[(kind, b)]
                g_["smax"].append(float(s.abs().max()))
                g_["gamma"].append(gamma)
                g_["median"].append(float(per_group.median()))
                g_["max"].append(float(per_group.max()))
                exact = _grads(lambda q_, k_, v_: scatterattn.dense_attention(q_, k_, v_, is_causal=is_causal),
                               q, k, v, do)
                probs = None  # the exact attention matrix, for the support mass of the sparse methods
                for key in series:
                    if key[0] != kind or (key, b) not in acc:
                        continue
                    _, method, m = key
                    chain_kw, sb_kw = method_kwargs(method, width)
                    stats = lora.ChainedGradientStats()
                    approx = _grads(
                        lambda q_, k_, v_: scatterattn.chained_lowrank_attention(
                            q_, k_, v_, is_causal=is_causal, num_features=m, seed=seed + FEATURE_SEED_OFFSET,
                            stats=stats, **chain_kw,
                        ),
                        q, k, v, do,
                    )
                    dv_sb = _dv(lambda v_: scatterattn.scatterbrain_attention(
                        q, k, v_, is_causal=is_causal, num_features=m, seed=seed + FEATURE_SEED_OFFSET,
                        backend="reference", **sb_kw), v, do)
                    a = acc[(key, b)]
                    if method != "plain":
                        if probs is None:
                            eye = torch.eye(n, dtype=q.dtype).expand(batch, heads, n, n)
                            probs = scatterattn.dense_attention(q, k, eye, is_causal=is_causal)
                        support = scatterattn.attention_support(q, k, is_causal=is_causal, num_features=m,
                                                                seed=seed + FEATURE_SEED_OFFSET, **sb_kw)
                        a["mass"].append(float((probs * support).sum(-1).mean()))
                    # no threshold-fallback: only a numeric fallback (underflowing factors) makes a group exact
                    a["numeric"] += stats.fallback
                    a["sparse"] += stats.sparse
                    a["groups"] += stats.approximate + stats.fallback
                    if not stats.fallback:  # exact groups would not match Scatterbrain's f~
                        a["check"].append(_rel(approx[2], dv_sb))
                    for g, x, e in zip(GRADS, approx, exact):
                        a["err"][g].append(_rel(x, e))
                        a["cos"][g].append(_cos(x, e))
                    if verbose:
                        errs = ", ".join(f"{g} {a['err'][g][-1]:.3f}" for g in GRADS)
                        print(f"  {kind} {method} seed {seed} bound {b:.3g} m {m}: {errs}", file=sys.stderr,
                              flush=True)
    elapsed = time.perf_counter() - start
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else None  # 5-minute load average at the end

    rows = []
    for key, b in points:
        kind, method, m = key
        g_, a = geo[(kind, b)], acc[(key, b)]
        row = {
            "data": kind, "method": method, "width": None if method == "plain" else width,
            "bound": statistics.fmean(g_["max"]),
            "target": b,
            "bound_median": statistics.fmean(g_["median"]),
            "smax": statistics.fmean(g_["smax"]),
            "gamma": statistics.fmean(g_["gamma"]),
            "m": m,
            "n": n, "d": d, "heads": heads, "batch": batch, "n_seeds": len(seeds),
            "is_causal": is_causal, "elapsed_s": elapsed, "load_avg": load,
        }
        for g in GRADS:
            row[f"{g}_err"], row[f"{g}_err_std"] = _mean_std(a["err"][g])
            row[f"{g}_cos"], row[f"{g}_cos_std"] = _mean_std(a["cos"][g])
        row["numeric_fallback"] = a["numeric"]
        row["sparse_groups"] = a["sparse"]
        row["groups"] = a["groups"]
        row["check"] = max(a["check"]) if a["check"] else None
        row["support_mass"] = statistics.fmean(a["mass"]) if a["mass"] else None
        row["worst_err"] = max(row[f"{g}_err"] for g in GRADS)
        row["min_cos"] = min(row[f"{g}_cos"] for g in GRADS)
        rows.append(row)
    if out_dir is not None:
        write_outputs(rows, out_dir, seeds)
    return rows


# ------------------------------------------------------------------------------------------ analysis


def _series(rows: list[dict], m: int, data=None, method=None) -> list[dict]:
    """Rows of one curve; data / method None: any (rows without those keys count as gaussian / plain)."""
    return [r for r in rows if r["m"] == m and (data is None or r.get("data", "gaussian") == data)
            and (method is None or r.get("method", "plain") == method)]


def _keys(rows: list[dict]):
    """(data, method, m) of every curve, in row order."""
    seen = []
    for r in rows:
        key = (r.get("data", "gaussian"), r.get("method", "plain"), r["m"])
        if key not in seen:
            seen.append(key)
    return seen


def crossing(rows: list[dict], m: int, level: float, key: str = "worst_err", data=None, method=None):
    """Logit bound where `key` (mean over seeds) first reaches `level` at m features (on `data` with
    `method`, when given), interpolated linearly in (log bound, log error). Returns (value, kind):
    kind 'at' (interpolated), 'below' (already above the level at the smallest bound: value = smallest
    bound) or 'above' (never reached: value = largest bound)."""
    pts = [(r["bound"], r[key]) for r in _series(rows, m, data, method)]
    if not pts:
        raise ValueError(f"no rows for m={m}, data={data}, method={method}")
    if pts[0][1] >= level:
        return pts[0][0], "below"
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if e1 >= level:
            t = (math.log(level) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))), "at"
    return pts[-1][0], "above"


def error_at(rows: list[dict], m: int, bound: float, key: str = "worst_err", data=None, method=None) -> float | None:
    """`key` at a logit bound, interpolated in (log bound, log error); None outside the sweep."""
    pts = [(r["bound"], r[key]) for r in _series(rows, m, data, method)]
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if b0 <= bound <= b1:
            t = (math.log(bound) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    return None


def _fmt_crossing(value_kind) -> str:
    value, kind = value_kind
    return {"at": f"{value:.3g}", "below": f"< {value:.3g}", "above": f"> {value:.3g}"}[kind]


def _curve_line(rows: list[dict], kind: str, method: str, m: int) -> str:
    rs = _series(rows, m, kind, method)
    thr = lora.DEFAULT_THRESHOLD
    cross = {lvl: crossing(rows, m, lvl, data=kind, method=method) for lvl in LEVELS}
    at_thr = error_at(rows, m, thr, data=kind, method=method)
    worst = max(rs, key=lambda r: r["worst_err"])
    text = (f"{method}, m = {m}: the worst of dq/dk/dv reaches 10% error at logit bound "
            f"{_fmt_crossing(cross[0.1])}, 20% at {_fmt_crossing(cross[0.2])}, 30% at {_fmt_crossing(cross[0.3])}, "
            f"100% at {_fmt_crossing(cross[1.0])}")
    if at_thr is not None:
        text += f"; at the default threshold {thr:g} it is {100 * at_thr:.0f}%"
    text += f"; peak {100 * worst['worst_err']:.0f}% at bound {worst['bound']:.3g}"
    cos = {}
    for level in (0.9, 0.5):
        below = [r for r in rs if r["min_cos"] < level]
        cos[level] = f"{below[0]['bound']:.3g}" if below else f"> {rs[-1]['bound']:.3g}"
    text += f"; min cosine < 0.9 from bound {cos[0.9]}, < 0.5 from {cos[0.5]} (first sweep point)"
    return text + "."


def verdict_lines(rows: list[dict], kind: str) -> list[str]:
    """Plainly: does each sparse method beat the plain chain anywhere on this data, by how much, and
    how much of the exact attention mass its support holds."""
    keys = _keys(rows)
    lines = []
    for method in [x for x in METHODS if x != "plain" and any(k[0] == kind and k[1] == x for k in keys)]:
        wins, pairs_all, shared, cross, ends, mass = [], [], 0, [], [], []
        for _, _, m in [k for k in keys if k[0] == kind and k[1] == method]:
            rs = _series(rows, m, kind, method)
            mass += [r for r in rs if r.get("support_mass") is not None]
            if (kind, "plain", m) not in keys:
                continue
            plain = {r["target"]: r for r in _series(rows, m, kind, "plain")}
            pairs = [(r, plain[r["target"]]) for r in rs if r["target"] in plain]
            shared += len(pairs)
            wins += [(m, r, p_) for r, p_ in pairs if r["worst_err"] < p_["worst_err"]]
            pairs_all += [(m, r, p_) for r, p_ in pairs]
            cross.append(f"m = {m}: {_fmt_crossing(crossing(rows, m, 0.2, data=kind, method=method))} vs "
                         f"{_fmt_crossing(crossing(rows, m, 0.2, data=kind, method='plain'))}")
            (r0, p0), (r1, p1) = pairs[0], pairs[-1]
            ends.append(f"m = {m}: {100 * r0['worst_err']:.0f}% vs {100 * p0['worst_err']:.0f}% at bound "
                        f"{r0['bound']:.3g}, {100 * r1['worst_err']:.0f}% vs {100 * p1['worst_err']:.0f}% at "
                        f"{r1['bound']:.3g}")
        if not shared:
            continue

        def point(w):
            m, r, p_ = w
            return (f"{r['worst_err'] / p_['worst_err']:.2f} at m = {m}, bound {r['bound']:.3g} "
                    f"({100 * r['worst_err']:.1f}% vs {100 * p_['worst_err']:.1f}%)")

        usable = [w for w in pairs_all if w[2]["worst_err"] < 0.3]
        text = (f"{method} is better than the plain chain at {len(wins)} of {shared} shared (m, bound) points"
                f" ({sum(w[2]['worst_err'] < 0.3 for w in wins)} of {len(usable)} where the plain chain's error is "
                f"below 30%)")
        if usable:
            ratio = sorted(usable, key=lambda w: w[1]["worst_err"] / w[2]["worst_err"])
            text += f"; there the sparse / plain error ratio runs from {point(ratio[0])} to {point(ratio[-1])}"
        rest = [w for w in pairs_all if w[2]["worst_err"] >= 0.3]
        if rest:
            ratio = sorted(rest, key=lambda w: w[1]["worst_err"] / w[2]["worst_err"])
            text += f"; where plain is >= 30% (unusable either way), from {point(ratio[0])} to {point(ratio[-1])}"
        text += (". Worst-gradient error, sparse vs plain: " + "; ".join(ends)
                 + ". 20% crossing bound, sparse vs plain: " + "; ".join(cross) + ".")
        if mass:
            lo, hi = mass[0], max(mass, key=lambda r: r["bound"])
            share = 100 * lo["width"] / lo["n"]
            text += (f" Its support ({lo['width']} keys of {lo['n']}, uniform share {share:.1f}%) "
                     f"holds {100 * lo['support_mass']:.0f}% of the exact attention mass at bound {lo['bound']:.3g} "
                     f"and {100 * hi['support_mass']:.0f}% at {hi['bound']:.3g} (m = {lo['m']}).")
        lines.append(text)
    return lines


def check_lines(rows: list[dict]) -> list[str]:
    """The attention-matrix check: the chain's dv against autograd through scatterbrain_attention."""
    lines = []
    for method in [m for m in METHODS if any(r.get("method") == m for r in rows)]:
        vals = [r["check"] for r in rows if r.get("method") == method and r.get("check") is not None]
        if not vals:
            continue
        ref = "Performer (sparse='none')" if method == "plain" else "Scatterbrain with the same support"
        worst = max(vals)
        if worst <= CHECK_TOL:
            lines.append(f"{method}: dv = f~^T dO matches autograd through `scatterbrain_attention` ({ref}) to "
                         f"{worst:.1e} (relative): the chain's attention matrix is {ref}'s, as documented.")
        else:
            lines.append(
                f"**{method}: dv = f~^T dO differs from autograd through `scatterbrain_attention` ({ref}) by up to "
                f"{100 * worst:.0f}% (median {100 * statistics.median(vals):.0f}%)**: the attention matrix the chain "
                f"uses is NOT {ref}'s, contrary to the docstring of `chained_lowrank_attention`; the numbers of this "
                f"method measure the implementation as it is, not Scatterbrain's f~.")
    return lines


def summary_lines(rows: list[dict]) -> list[str]:
    """Per data kind: every curve's crossings, the sparse-vs-plain comparison, the threshold verdict."""
    thr = lora.DEFAULT_THRESHOLD
    lines = []
    keys = _keys(rows)
    for kind in [k for k in DATA if any(key[0] == k for key in keys)]:
        for _, method, m in [key for key in keys if key[0] == kind]:
            lines.append(f"[{kind}] " + _curve_line(rows, kind, method, m))
        ms = sorted({m for k_, method, m in keys if k_ == kind and method == "plain"}, reverse=True)
        if len(ms) >= 2:
            hi, lo = ms[0], ms[-1]
            ratio = _series(rows, lo, kind, "plain")[0]["worst_err"] / _series(rows, hi, kind, "plain")[0]["worst_err"]
            lines.append(
                f"[{kind}] plain: at the smallest bound ({_series(rows, hi, kind, 'plain')[0]['bound']:.3g}) the error "
                f"ratio m={lo} / m={hi} is {ratio:.2f} (1/sqrt(m) scaling predicts {math.sqrt(hi / lo):.2f}).")
        if ms:
            m_ref = 256 if 256 in ms else ms[0]
            value, where = crossing(rows, m_ref, 0.2, data=kind, method="plain")
            r0 = _series(rows, m_ref, kind, "plain")[0]
            if where == "at":
                verdict = "too high" if value < thr * 0.9 else ("about right" if value <= thr * 1.1 else "conservative")
                lines.append(
                    f"[{kind}] Threshold: <= 20% worst-gradient error of the plain chain at m = {m_ref} needs logit "
                    f"bound <= {value:.2g} (interpolated); the default {thr:g} is {verdict} for this data (where the "
                    f"bound is {r0['bound'] / r0['smax']:.1f}x the actual max |s_ij|).")
            else:
                lines.append(f"[{kind}] Threshold: the plain chain's 20% level at m = {m_ref} is "
                             f"{_fmt_crossing((value, where))} in this sweep.")
    return lines


# -------------------------------------------------------------------------------------------- output


def format_table(rows: list[dict], m: int, data=None, method=None) -> str:
    rs = _series(rows, m, data, method)
    mass = any(r.get("support_mass") is not None for r in rs)
    head = ["logit bound", "median group bound", "max abs s_ij", "gamma",
            "dq err", "dk err", "dv err", "dq cos", "dk cos", "dv cos"] + (["support mass"] if mass else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    multi = rows[0]["n_seeds"] > 1
    for r in rs:
        cells = [f"{r['bound']:.3g}", f"{r['bound_median']:.3g}", f"{r['smax']:.3g}", f"{r['gamma']:.3g}"]
        for g in GRADS:
            cells.append(f"{r[f'{g}_err']:.4f}" + (f" ± {r[f'{g}_err_std']:.4f}" if multi else ""))
        for g in GRADS:
            cells.append(f"{r[f'{g}_cos']:.4f}")
        if mass:
            cells.append(f"{r['support_mass']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(rows: list[dict], kind: str) -> str:
    """Worst-gradient error (mean over seeds) of every (method, m) curve, one row per bound; bold = best."""
    keys = [k for k in _keys(rows) if k[0] == kind]
    head = ["logit bound", "max abs s_ij"] + [f"{method} m={m}" for _, method, m in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {k: {r["target"]: r for r in _series(rows, k[2], kind, k[1])} for k in keys}
    for target in sorted({r["target"] for r in rows if r.get("data", "gaussian") == kind}):
        present = [by[k][target] for k in keys if target in by[k]]
        if not present:
            continue
        best = min(r["worst_err"] for r in present)
        cells = [f"{present[0]['bound']:.3g}", f"{present[0]['smax']:.3g}"]
        for k in keys:
            r = by[k].get(target)
            if r is None:
                cells.append("")
            else:
                cell = f"{r['worst_err']:.3f}"
                cells.append(f"**{cell}**" if r["worst_err"] == best and len(keys) > 1 else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossing_table(rows: list[dict]) -> str:
    head = ["data", "method", "m", "gradient"] + [f"{int(100 * lvl)}% error at bound" for lvl in LEVELS] + [
        f"error at bound {lora.DEFAULT_THRESHOLD:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, method, m in _keys(rows):
        for key, name in [(f"{g}_err", g) for g in GRADS] + [("worst_err", "worst")]:
            at = error_at(rows, m, lora.DEFAULT_THRESHOLD, key, data=kind, method=method)
            cells = [kind, method, str(m), name] + [
                _fmt_crossing(crossing(rows, m, lvl, key, data=kind, method=method)) for lvl in LEVELS]
            cells.append("n/a" if at is None else f"{at:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_text(rows: list[dict], seeds) -> str:
    r = rows[0]
    bounds = sorted({x["target"] for x in rows})
    kinds = [k for k in DATA if any(x.get("data", "gaussian") == k for x in rows)]
    methods = [k for k in METHODS if any(x.get("method", "plain") == k for x in rows)]
    ms = {method: sorted({x["m"] for x in rows if x.get("method", "plain") == method}, reverse=True)
          for method in methods}
    n_targets = {method: len({x["target"] for x in rows if x.get("method", "plain") == method}) for method in methods}
    width = next((x["width"] for x in rows if x.get("width")), None)
    n, d = r["n"], r["d"]
    data_text = {
        "gaussian": "gaussian: Q, K, V, dO i.i.d. N(0, 1)",
        "clustered": (f"clustered: per (batch, head) C = N/{CLUSTER_DIV} = {max(1, n // CLUSTER_DIV)} centres ~ "
                      f"N(0, I); each query and key = a uniformly drawn centre + {CLUSTER_SPREAD} N(0, I) (positions "
                      f"random: a local window sees no cluster structure); V, dO i.i.d. N(0, 1)"),
    }
    method_text = {
        "plain": "plain: threshold=None (every group the plain chain)",
        "sparse-lsh": f"sparse-lsh: threshold=0, sparse='lsh', bucket_size={width} (N/{n // width if width else '?'}), "
                      f"n_hashes=1",
        "sparse-local": f"sparse-local: threshold=0, sparse='local', window={width} "
                        f"(|i - j| <= {width // 2 if width else '?'})",
    }
    ratio = {k: statistics.fmean(x["bound"] / x["smax"] for x in rows if x.get("data", "gaussian") == k) for k in kinds}
    lines = [
        f"- Shape (B={r['batch']}, H={r['heads']}, N={n}, D={d}), float64; "
        f"{'causal' if r['is_causal'] else 'non-causal'}; tau = 1/sqrt(D).",
        "- Data: " + "; ".join(data_text[k] for k in kinds) + ".",
        f"- Q and K scaled by gamma so that max over (batch, head) groups of `logit_bound` = tau max|q| max|k| "
        f"equals each of {len(bounds)} log-spaced targets from {bounds[0]:.3g} to {bounds[-1]:.3g} (bound / actual "
        f"max |s_ij|: " + ", ".join(f"{k} {ratio[k]:.2f}x" for k in kinds) + ").",
        "- Methods: " + "; ".join(
            f"{method_text[k]}, m = {ms[k]}" + ("" if n_targets[k] == len(bounds) else
                                                 f", at {n_targets[k]} of the {len(bounds)} targets (every other "
                                                 f"one, to fit the time budget)" if 2 * n_targets[k] - 1 == len(bounds)
                                                 else f", at {n_targets[k]} of the {len(bounds)} targets")
            for k in methods)
        + ". Random features positive / FAVOR+, orthogonal, factors='random'.",
        f"- Seeds {list(seeds)}: data seed s, feature seed s + {FEATURE_SEED_OFFSET} (the same feature matrix for "
        f"every method; LSH projections drawn after it); mean ± sample std over {r['n_seeds']} seed(s).",
        "- Metrics: relative Frobenius error ||g~ - g||_F / ||g||_F and cosine similarity against exact autograd "
        "through `scatterattn.dense_attention`, g in dq, dk, dv; 'worst' = max of the three mean errors.",
        f"- Groups that took the sparse-corrected chain: {sum(x.get('sparse_groups', 0) for x in rows)} of "
        f"{sum(x['groups'] for x in rows if x.get('method', 'plain') != 'plain')} sparse-method groups.",
        f"- Numeric fallbacks (groups the package computed exactly because the factors underflowed): "
        f"{sum(x['numeric_fallback'] for x in rows)} of {sum(x['groups'] for x in rows)} groups over the whole sweep"
        + ("" if not any(x["numeric_fallback"] for x in rows) else
           " -- rows with numeric fallbacks understate the error of the approximation"),
        f"- scatterattn commit {git_commit()}.",
    ]
    return "\n".join(lines)


def format_markdown(rows: list[dict], seeds) -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    kinds = [k for k in DATA if any(r.get("data", "gaussian") == k for r in rows)]
    checks = check_lines(rows)
    parts = [
        "# Chained low-rank gradient: error vs logit range (phase transition)",
        "",
        f"CPU, float64 (scatterattn {scatterattn.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {date}; sweep took {rows[0]['elapsed_s']:.1f} s"
        + (f" (5-minute load average {rows[0]['load_avg']:.1f} at the end: other processes shared the CPUs)"
           if (rows[0].get("load_avg") or 0) > 1.5 else "") + ".",
        "Generated by `python bench/phase_transition.py`.",
        "",
        "## Settings",
        "",
        settings_text(rows, seeds),
        "",
    ]
    verdicts = [f"- [{kind}] {line}" for kind in kinds for line in verdict_lines(rows, kind)]
    if verdicts:
        failed = [line for line in checks if line.startswith("**")]
        parts += ["## Verdict: does the sparse-corrected chain beat the plain chain?", "", *verdicts]
        if failed:
            parts.append("- The sparse-corrected numbers measure an attention matrix that is NOT Scatterbrain's "
                         "(see the check below): they judge the implementation as it is, not the method.")
        parts.append("")
    parts += [
        "## Summary",
        "",
        *[f"- {line}" for line in summary_lines(rows)],
        "",
    ]
    if checks:
        parts += [
            "## Check: is the chain's attention matrix the documented one?",
            "",
            "dv = f~^T dO is linear in the attention matrix f~, so the chain's dv must equal autograd's dv through "
            "`scatterattn.scatterbrain_attention` with the same settings and seed (largest relative difference over "
            "all points; groups with a numeric fallback excluded).",
            "",
            *[f"- {line}" for line in checks],
            "",
        ]
    for kind in kinds:
        parts += [f"## Worst-gradient error by method ({kind} data)", "",
                  "Mean over seeds of max(dq, dk, dv relative error); bold = smallest in the row.", "",
                  comparison_table(rows, kind), ""]
    parts += [
        f"## Where the error crosses each level (package default threshold = {lora.DEFAULT_THRESHOLD:g})",
        "",
        "Logit bound at which the mean error first reaches the level, interpolated in log-log between sweep "
        "points ('<' / '>': outside the sweep).",
        "",
        crossing_table(rows),
        "",
    ]
    for kind, method, m in _keys(rows):
        parts += [f"## {kind}, {method}, m = {m}", "", format_table(rows, m, kind, method), ""]
    return "\n".join(parts)


def write_plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG", file=sys.stderr)
        return False
    kinds = [k for k in DATA if any(r.get("data", "gaussian") == k for r in rows)]
    colors = {"plain": "tab:blue", "sparse-lsh": "tab:red", "sparse-local": "tab:green"}
    all_ms = sorted({r["m"] for r in rows}, reverse=True)
    styles = {m: s for m, s in zip(all_ms, ["-", "--", ":", "-."] * len(all_ms))}
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12.5, 4.4 * len(kinds)), constrained_layout=True,
                             squeeze=False)
    r0 = rows[0]
    for ki, kind in enumerate(kinds):
        ax_err, ax_cos = axes[ki]
        for _, method, m in [k for k in _keys(rows) if k[0] == kind]:
            rs = _series(rows, m, kind, method)
            x = [r["bound"] for r in rs]
            style = dict(linestyle=styles[m], marker="o", markersize=3, color=colors.get(method, "black"),
                         label=f"{method}, m={m}")
            ax_err.plot(x, [r["worst_err"] for r in rs], **style)
            ax_cos.plot(x, [r["min_cos"] for r in rs], **style)
        for ax in (ax_err, ax_cos):
            ax.axvline(lora.DEFAULT_THRESHOLD, color="black", linewidth=1.2, alpha=0.7,
                       label=f"DEFAULT_THRESHOLD = {lora.DEFAULT_THRESHOLD:g}")
            ax.set_xscale("log")
            ax.set_xlabel("logit bound  tau max|q| max|k|  (max over groups)")
            ax.grid(True, which="both", alpha=0.3)
        for level in (0.1, 0.2, 1.0):
            ax_err.axhline(level, color="grey", linestyle=":", linewidth=0.8)
        ax_err.set_yscale("log")
        ax_err.set_ylabel("worst of dq, dk, dv relative error\n(mean over seeds; dotted: 10%, 20%, 100%)")
        ax_err.set_title(f"{kind} data: relative error", fontsize=10)
        ax_cos.set_ylabel("min of dq, dk, dv cosine similarity")
        ax_cos.set_title(f"{kind} data: cosine similarity with the exact gradient", fontsize=10)
        ax_err.legend(fontsize=8, ncol=2)
        ratio = statistics.fmean(r["smax"] / r["bound"] for r in rows if r.get("data", "gaussian") == kind)
        sec = ax_err.secondary_xaxis("top", functions=(lambda b, c=ratio: b * c, lambda s, c=ratio: s / c))
        sec.set_xlabel(f"~ actual max |s_ij| (mean ratio {ratio:.2f} x bound)", fontsize=8)
    fig.suptitle(
        f"Chained low-rank backward vs exact autograd (B={r0['batch']}, H={r0['heads']}, N={r0['n']}, D={r0['d']}, "
        f"float64, {'causal' if r0['is_causal'] else 'non-causal'}, {r0['n_seeds']} seeds; plain: threshold=None, "
        f"sparse: threshold=0)",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out_dir, seeds) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / "phase_transition.md"
    md_path.write_text(format_markdown(rows, seeds))
    json_path = out_dir / "phase_transition.json"
    json_path.write_text(json.dumps({
        "generated": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seeds": list(seeds),
        "default_threshold": lora.DEFAULT_THRESHOLD, "summary": summary_lines(rows), "check": check_lines(rows),
        "verdict": {kind: verdict_lines(rows, kind) for kind in DATA},
        "rows": rows,
    }, indent=1) + "\n")
    written = {"md": md_path, "json": json_path}
    png_path = out_dir / "phase_transition.png"
    if write_plot(rows, png_path):
        written["png"] = png_path
    return written


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="sequence length (default 512; quick 128)")
    p.add_argument("--d", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--heads", type=int, default=None, help="heads (default 4; quick 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--features", type=int, nargs="+", default=None, help="values of m (default 256 64; quick 64)")
    p.add_argument("--sparse-features", type=int, nargs="+", default=None,
                   help="values of m for the sparse methods (default: as --features)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick 0)")
    p.add_argument("--bounds", type=float, nargs="+", default=None, help="explicit logit-bound targets")
    p.add_argument("--bound-min", type=float, default=0.1)
    p.add_argument("--bound-max", type=float, default=30.0)
    p.add_argument("--num-bounds", type=int, default=None, help="number of targets (default 13; quick 5)")
    p.add_argument("--data", choices=("gaussian", "clustered", "both"), default="both",
                   help="data distribution (default both)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods (default: all)")
    p.add_argument("--sparse-every", type=int, default=None,
                   help="sparse methods at every K-th target only, the largest always included (default 2; quick 1)")
    p.add_argument("--width", type=int, default=None,
                   help="LSH bucket size and local window of the sparse methods (default N/8)")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--quick", action="store_true", help="small run (~15 s); prints only unless --out-dir")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write (default {DEFAULT_OUT_DIR})")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    quick = args.quick
    n = args.n if args.n is not None else (128 if quick else 512)
    heads = args.heads if args.heads is not None else (2 if quick else 4)
    seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    features = args.features if args.features is not None else ([64] if quick else [256, 64])
    num = args.num_bounds if args.num_bounds is not None else (5 if quick else 13)
    bounds = sorted(args.bounds if args.bounds is not None else log_space(args.bound_min, args.bound_max, num))
    every = args.sparse_every if args.sparse_every is not None else (1 if quick else 2)
    if every < 1:
        raise SystemExit("--sparse-every must be >= 1")
    sparse_bounds = bounds[::every] + ([] if (len(bounds) - 1) % every == 0 else bounds[-1:])
    data = DATA if args.data == "both" else (args.data,)
    if args.no_write:
        out_dir = None
    elif args.out_dir is not None:
        out_dir = args.out_dir
    else:
        out_dir = None if quick else DEFAULT_OUT_DIR
    rows = run_sweep(n=n, d=args.d, heads=heads, batch=args.batch, features=features, bounds=bounds,
                     seeds=seeds, is_causal=args.causal, data=data, methods=args.methods, width=args.width,
                     sparse_features=args.sparse_features, sparse_bounds=sparse_bounds, out_dir=None,
                     verbose=args.verbose)
    written = write_outputs(rows, out_dir, seeds) if out_dir is not None else {}
    print(f"CPU float64, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sweep took {rows[0]['elapsed_s']:.1f} s")
    print(settings_text(rows, seeds))
    print()
    for kind in [k for k in DATA if any(r["data"] == k for r in rows)]:
        for line in verdict_lines(rows, kind):
            print(f"[{kind}] {line}")
    print()
    for line in summary_lines(rows):
        print(line)
    print()
    for line in check_lines(rows):
        print(line)
    for kind in [k for k in DATA if any(r["data"] == k for r in rows)]:
        print(f"\nworst-gradient error, {kind} data")
        print(comparison_table(rows, kind))
    print()
    print(crossing_table(rows))
    if written:
        print("wrote " + " and ".join(str(p) for p in written.values()))
    return rows


if __name__ == "__main__":
    main()
