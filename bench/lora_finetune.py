"""LoRA fine-tuning through the chained low-rank attention backward, against the exact backward.

A small causal transformer LM (plain torch modules; each attention layer has q_proj / k_proj / v_proj /
o_proj nn.Linear layers and a pluggable attention function) is pre-trained from scratch, with exact
attention, on synthetic repeated-pattern sequences: a random segment of `period` tokens, then copies
of it, each copy the previous one with every token shifted by `shift` (mod vocab). Pre-training uses
(period, shift) = (8, 0): plain copying. The model is then fine-tuned with peft LoRA on a shifted task
(default (8, 1): every copy is the previous one plus one, so the copy mechanism must be re-targeted),
adapting W_Q, W_V ('partial') or W_Q, W_K, W_V ('full'), with

  exact              `scatterattn.dense_attention` (exact forward and backward)
  chained            `scatterattn.ChainedLowRankAttention` at the package's default threshold
                     (groups whose logit bound exceeds it fall back to the exact backward)
  chained-nofallback the same with threshold=None (every group uses the approximate backward)

Same pre-trained weights, LoRA initialisation, batches and seeds for every run. Loss is the
next-token cross entropy on the predictable positions (after the first segment). The chained runs
report how many (batch, head) groups fell back (ChainedLowRankAttention.stats, summed over layers):
if (nearly) everything falls back, the 'chained' run is the exact backward and its curve says
nothing about the approximation, which is why 'chained-nofallback' is run too. Also reported: the
cosine similarity between the chained and the exact LoRA gradient on the first fine-tuning batch,
and the logit bounds of the pre-trained model on the fine-tuning data.

    python bench/lora_finetune.py            # default (~3 min on 2 CPUs), writes bench/results/
    python bench/lora_finetune.py --quick    # ~20 s, prints only (add --out-dir to write)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import scatterattn
from scatterattn import lora

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("exact", "chained", "chained-nofallback")
MODES = ("partial", "full")


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


# ----------------------------------------------------------------------------------------------- model


def exact_attention(q, k, v, *, is_causal=False):
    return scatterattn.dense_attention(q, k, v, is_causal=is_causal)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, attention=exact_attention):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.attention = attention  # callable (q, k, v, *, is_causal) on (B, H, N, D); may be a Module

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = self.attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc_in = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))


class TinyLM(nn.Module):
    """Pre-LN causal transformer LM with learned positions."""

    def __init__(self, vocab: int = 32, d_model: int = 64, heads: int = 4, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.heads = heads
        self.head_dim = d_model // heads

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def set_attention(self, factory):
        """factory(layer_index) -> attention callable, installed in every layer."""
        for i, block in enumerate(self.blocks):
            block.attn.attention = factory(i)


# ------------------------------------------------------------------------------------------------ data


def make_batch(batch: int, seq_len: int, vocab: int, period: int, shift: int, gen: torch.Generator):
    """(tokens (B, L), loss mask (B, L-1)): a random segment of `period` tokens, then copies, each the
    previous copy + shift (mod vocab). The mask selects the predictable next-token targets."""
    seg = torch.randint(0, vocab, (batch, period), generator=gen)
    copies = math.ceil(seq_len / period)
    offsets = (torch.arange(copies) * shift).repeat_interleave(period)[:seq_len]
    tokens = (seg.repeat(1, copies)[:, :seq_len] + offsets) % vocab
    mask = torch.zeros(batch, seq_len - 1, dtype=torch.bool)
    mask[:, period - 1:] = True  # target at position t+1 >= period is predictable
    return tokens, mask


def lm_loss(model, tokens, mask):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum()


# ------------------------------------------------------------------------------------------- training


def pretrain(cfg: dict) -> tuple[TinyLM, list[float], float]:
    torch.manual_seed(cfg["seed"])
    model = TinyLM(cfg["vocab"], cfg["d_model"], cfg["heads"], cfg["layers"], cfg["seq_len"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    losses = []
    start = time.perf_counter()
    for step in range(cfg["pretrain_steps"]):
        tokens, mask = make_batch(cfg["batch"], cfg["seq_len"], cfg["vocab"], cfg["pretrain_period"],
                                  cfg["pretrain_shift"], gen)
        lr = cfg["pretrain_lr"] * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return model, losses, time.perf_counter() - start


class BoundProbe:
    """Attention wrapper recording the per-(batch, head) logit bounds of each call (exact attention)."""

    def __init__(self):
        self.bounds = []

    def __call__(self, q, k, v, *, is_causal=False):
        self.bounds.append(lora.logit_bound(q, k, q.shape[-1] ** -0.5).flatten())
        return exact_attention(q, k, v, is_causal=is_causal)


def logit_bounds(model: TinyLM, tokens) -> list[torch.Tensor]:
    """Per layer, the (B * H,) logit bounds of `model` on `tokens`."""
    probes = []
    saved = [b.attn.attention for b in model.blocks]
    model.set_attention(lambda i: probes.append(BoundProbe()) or probes[-1])
    with torch.no_grad():
        model(tokens[:, :-1])
    for block, att in zip(model.blocks, saved):
        block.attn.attention = att
    return [torch.cat(p.bounds) for p in probes]


class ExactWithBound:
    """Exact attention that records the largest per-(batch, head) logit bound it has seen."""

    def __init__(self):
        self.max_logit_bound = 0.0

    def __call__(self, q, k, v, *, is_causal=False):
        if torch.is_grad_enabled():  # training forwards only, as the chained stats (recorded in backward)
            bound = float(lora.logit_bound(q, k, q.shape[-1] ** -0.5).max())
            self.max_logit_bound = max(self.max_logit_bound, bound)
        return exact_attention(q, k, v, is_causal=is_causal)


def attention_factory(method: str, cfg: dict):
    if method == "exact":
        return lambda i: ExactWithBound()
    threshold = cfg["threshold"] if method == "chained" else None
    return lambda i: lora.ChainedLowRankAttention(
        cfg["head_dim"], num_features=cfg["num_features"], threshold=threshold,
        redraw_interval=cfg["redraw_interval"], seed=cfg["seed"] * 1000 + 17 + i,
    )


def peft_model(base: TinyLM, mode: str, method: str, cfg: dict):
    import peft

    model = copy.deepcopy(base)
    model.set_attention(attention_factory(method, cfg))
    targets = lora.attention_lora_targets(model, mode)
    torch.manual_seed(cfg["seed"] + 2)  # the same LoRA initialisation for every method
    config = peft.LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=targets, lora_dropout=0.0,
                             init_lora_weights="gaussian")
    return peft.get_peft_model(model, config), targets


def _attention_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, lora.ChainedLowRankAttention)]


def finetune(base: TinyLM, mode: str, method: str, cfg: dict) -> dict:
    model, targets = peft_model(base, mode, method, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 3)  # the same batches for every method
    eval_batch = make_batch(cfg["eval_batch"], cfg["seq_len"], cfg["vocab"], cfg["period"], cfg["shift"],
                            torch.Generator().manual_seed(cfg["seed"] + 4))
    losses, eval_losses, step_times, fallback_curve = [], [], [], []
    attn_mods = _attention_modules(model)
    trackers = [b.attn.attention for b in model.base_model.model.blocks if isinstance(b.attn.attention, ExactWithBound)]
    stopped = None
    for step in range(cfg["steps"]):
        tokens, mask = make_batch(cfg["batch"], cfg["seq_len"], cfg["vocab"], cfg["period"], cfg["shift"], gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, mask)
        loss.backward()
        finite = math.isfinite(loss.item()) and all(bool(torch.isfinite(p.grad).all()) for p in params)
        if not finite:  # report it and stop: an Adam step on NaN / inf would only poison the weights
            stopped = step
            break
        opt.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if attn_mods:
            last = [m.stats.history[-1] for m in attn_mods]
            fallback_curve.append(sum(f for _, f in last) / max(1, sum(a + f for a, f in last)))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"] - 1:
            model.eval()  # no redraw in eval mode
            with torch.no_grad():
                eval_losses.append((step, lm_loss(model, *eval_batch).item()))
            model.train()
    if stopped is not None and (not eval_losses or eval_losses[-1][0] != step - 1):  # the last finite weights
        model.eval()
        with torch.no_grad():
            eval_losses.append((step - 1, lm_loss(model, *eval_batch).item()))
    approx = sum(m.stats.approximate for m in attn_mods)
    fallback = sum(m.stats.fallback for m in attn_mods)
    numeric = sum(getattr(m.stats, "numeric", 0) for m in attn_mods)
    bounds = [m.stats.max_logit_bound for m in attn_mods] + [t.max_logit_bound for t in trackers]
    return {
        "mode": mode, "method": method, "targets": targets, "losses": losses, "eval_losses": eval_losses,
        "step_times": step_times, "fallback_curve": fallback_curve, "approximate": approx, "fallback": fallback,
        "numeric": numeric, "fallback_fraction": fallback / (approx + fallback) if approx + fallback else None,
        "max_logit_bound": max(bounds, default=None), "stopped_at": stopped,
        "trainable": sum(p.numel() for p in params),
    }


def gradient_cosine(base: TinyLM, mode: str, method: str, cfg: dict) -> float:
    """Cosine similarity of the LoRA gradient of `method` with the exact one, on the first fine-tuning
    batch, at the LoRA initialisation (B initialised non-zero: 'gaussian' init)."""
    tokens, mask = make_batch(cfg["batch"], cfg["seq_len"], cfg["vocab"], cfg["period"], cfg["shift"],
                              torch.Generator().manual_seed(cfg["seed"] + 3))
    flat = []
    for m in ("exact", method):
        model, _ = peft_model(base, mode, m, cfg)
        model.train()
        loss = lm_loss(model, tokens, mask)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        flat.append(torch.cat([g.flatten() for g in grads]))
    return float(F.cosine_similarity(flat[0], flat[1], dim=0))


def default_config(quick: bool = False) -> dict:
    cfg = dict(
        vocab=32, d_model=64, heads=4, layers=2, seq_len=48, batch=32, eval_batch=128,
        pretrain_period=8, pretrain_shift=0, pretrain_steps=400, pretrain_lr=3e-3,
        period=8, shift=1, steps=120, lr=3e-3, rank=8, alpha=16, eval_every=10,
        num_features=64, threshold=lora.DEFAULT_THRESHOLD, redraw_interval=1, seed=0,
        modes=list(MODES), methods=list(METHODS),
    )
    if quick:
        cfg.update(pretrain_steps=150, steps=30, batch=16, eval_batch=64, eval_every=5, layers=2)
    return cfg


def run(cfg: dict | None = None, out_dir=None, verbose: bool = False) -> dict:
    """Pre-train, fine-tune every (mode, method); returns {'config', 'pretrain_losses', 'pretrain_s',
    'bounds' (per-layer logit-bound summaries on the fine-tuning data), 'runs' (list of finetune dicts
    with 'grad_cos' added for chained methods), 'elapsed_s'}. Writes lora_finetune.{md,png} into out_dir
    only when it is given."""
    cfg = {**default_config(), **(cfg or {})}
    cfg["head_dim"] = cfg["d_model"] // cfg["heads"]
    start = time.perf_counter()
    base, pre_losses, pre_s = pretrain(cfg)
    if verbose:
        print(f"pretrained {cfg['pretrain_steps']} steps in {pre_s:.1f} s, loss {pre_losses[0]:.3f} -> "
              f"{statistics.fmean(pre_losses[-10:]):.3f}", file=sys.stderr, flush=True)
    probe_tokens, _ = make_batch(cfg["batch"], cfg["seq_len"], cfg["vocab"], cfg["period"], cfg["shift"],
                                 torch.Generator().manual_seed(cfg["seed"] + 3))
    bounds = []
    for i, b in enumerate(logit_bounds(base, probe_tokens)):
        bounds.append({"layer": i, "min": float(b.min()), "median": float(b.median()), "max": float(b.max()),
                       "above": float((b > cfg["threshold"]).float().mean())})
    runs = []
    for mode in cfg["modes"]:
        for method in cfg["methods"]:
            r = finetune(base, mode, method, cfg)
            r["grad_cos"] = None if method == "exact" else gradient_cosine(base, mode, method, cfg)
            runs.append(r)
            if verbose:
                ff = "" if r["fallback_fraction"] is None else f", fallback {100 * r['fallback_fraction']:.1f}%"
                print(f"{mode:>7} {method:<18} loss {r['losses'][0]:.3f} -> {r['eval_losses'][-1][1]:.3f} "
                      f"(eval), {1000 * _median(r['step_times']):.1f} ms/step{ff}", file=sys.stderr,
                      flush=True)
    result = {"config": cfg, "pretrain_losses": pre_losses, "pretrain_s": pre_s, "bounds": bounds, "runs": runs,
              "elapsed_s": time.perf_counter() - start}
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


# ---------------------------------------------------------------------------------------------- output


def _median(values):
    return statistics.median(values) if values else float("nan")


def _final(r, k=10):
    return statistics.fmean(r["losses"][-k:]) if r["losses"] else float("nan")


def format_table(result: dict) -> str:
    head = ["mode", "backward", "steps done", "train loss (first)", "train loss (mean last 10)", "eval loss (final)",
            "fallback groups (of which numeric)", "fallback %", "max logit bound", "LoRA grad cos vs exact (step 0)", "ms / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        total = r["approximate"] + r["fallback"]
        cells = [
            r["mode"], r["method"],
            f"{len(r['losses'])}" + ("" if r["stopped_at"] is None else f" (non-finite gradient at step {r['stopped_at']})"),
            f"{r['losses'][0] if r['losses'] else float('nan'):.4f}", f"{_final(r):.4f}", f"{r['eval_losses'][-1][1]:.4f}",
            "-" if r["method"] == "exact" else f"{r['fallback']} / {total} ({r['numeric']})",
            "-" if r["fallback_fraction"] is None else f"{100 * r['fallback_fraction']:.1f}",
            "-" if r["max_logit_bound"] is None else f"{r['max_logit_bound']:.3g}",
            "-" if r["grad_cos"] is None else f"{r['grad_cos']:.4f}",
            f"{1000 * statistics.median(r['step_times']):.1f}" if r["step_times"] else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bounds_table(result: dict) -> str:
    thr = result["config"]["threshold"]
    lines = ["| layer | min | median | max | groups above threshold " + f"{thr:g} |", "|---|---|---|---|---|"]
    for b in result["bounds"]:
        lines.append(f"| {b['layer']} | {b['min']:.3g} | {b['median']:.3g} | {b['max']:.3g} | "
                     f"{100 * b['above']:.0f}% |")
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    cfg = result["config"]
    runs = {(r["mode"], r["method"]): r for r in result["runs"]}
    lines = []
    for mode in cfg["modes"]:
        ex = runs.get((mode, "exact"))
        for method in cfg["methods"]:
            r = runs.get((mode, method))
            if r is None or method == "exact":
                continue
            ff = r["fallback_fraction"]
            text = f"{mode}, {method}: {100 * ff:.1f}% of (batch, head) groups fell back to the exact backward"
            if r["numeric"]:
                text += (f" ({r['numeric']} of the {r['fallback']} fallbacks were numeric: the package's factors "
                         f"underflowed below the threshold)")
            if r["stopped_at"] is not None:
                text += (f"; STOPPED: the gradient was non-finite (NaN / inf) at step {r['stopped_at']}, the losses "
                         f"below are those before it")
            if ff is not None and ff > 0.95:
                text += " -> this run is (almost) the exact backward; the comparison says nothing about the approximation"
            elif ff is not None and ff > 0.05:
                text += " (a mix of exact and approximate gradients)"
            if ex is not None:
                d = r["eval_losses"][-1][1] - ex["eval_losses"][-1][1]
                text += (f"; final eval loss {r['eval_losses'][-1][1]:.4f} vs exact {ex['eval_losses'][-1][1]:.4f} "
                         f"({'+' if d >= 0 else ''}{d:.4f}); step time x{_median(r['step_times']) / _median(ex['step_times']):.2f} of exact")
            if r["grad_cos"] is not None:
                text += f"; LoRA-gradient cosine with exact at step 0: {r['grad_cos']:.3f}"
            if ex is not None and r["max_logit_bound"] and ex["max_logit_bound"]:
                text += (f"; max logit bound during fine-tuning {r['max_logit_bound']:.3g} "
                         f"(exact backward: {ex['max_logit_bound']:.3g})")
            lines.append(text + ".")
    above = max(b["above"] for b in result["bounds"])
    lines.append(
        f"Logit bounds of the pre-trained model on the fine-tuning data: median per layer "
        f"{', '.join(format(b['median'], '.3g') for b in result['bounds'])}, max {max(b['max'] for b in result['bounds']):.3g}; "
        f"{100 * above:.0f}% of groups in the worst layer are above the threshold {cfg['threshold']:g}."
    )
    return lines


def settings_text(result: dict) -> str:
    c = result["config"]
    return "\n".join([
        f"- Model: pre-LN causal transformer LM, vocab {c['vocab']}, d_model {c['d_model']}, {c['heads']} heads "
        f"(head_dim {c['head_dim']}), {c['layers']} layers, MLP 4x, learned positions, seq len {c['seq_len']}; "
        f"attention computed by `scatterattn.dense_attention` unless stated.",
        f"- Data: random segment of `period` tokens then copies, each copy = previous + `shift` (mod vocab); loss = "
        f"next-token cross entropy on predictable positions only. Pre-training (exact attention, AdamW lr "
        f"{c['pretrain_lr']}, {c['pretrain_steps']} steps, batch {c['batch']}): period {c['pretrain_period']}, "
        f"shift {c['pretrain_shift']}; loss {result['pretrain_losses'][0]:.3f} -> "
        f"{statistics.fmean(result['pretrain_losses'][-10:]):.3f} in {result['pretrain_s']:.1f} s.",
        f"- Fine-tuning task: period {c['period']}, shift {c['shift']}; peft LoRA r={c['rank']}, alpha={c['alpha']}, "
        f"gaussian init, no dropout; Adam lr {c['lr']}, {c['steps']} steps, batch {c['batch']}; eval on a fixed "
        f"batch of {c['eval_batch']}. partial = q_proj, v_proj; full = q_proj, k_proj, v_proj (all layers).",
        f"- Chained backward: `ChainedLowRankAttention(head_dim={c['head_dim']}, num_features={c['num_features']}, "
        f"redraw_interval={c['redraw_interval']})`; 'chained' uses threshold={c['threshold']:g} "
        f"(package default DEFAULT_THRESHOLD = {lora.DEFAULT_THRESHOLD:g}), 'chained-nofallback' threshold=None. "
        f"Fallback counts are (batch, head) groups per backward, summed over layers and steps; 'numeric' = groups "
        f"computed exactly because the factors underflowed (ChainedGradientStats.numeric), whatever the threshold.",
        f"- Same pre-trained weights, LoRA init (seed {c['seed'] + 2}), batches (seed {c['seed'] + 3}) for every run; "
        f"one seed. Time per step = median wall time of forward + backward + Adam step, "
        f"{torch.get_num_threads()} CPU threads (shared machine: timings are noisy), float32.",
        f"- scatterattn commit {git_commit()}.",
    ])


def format_markdown(result: dict) -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join([
        "# LoRA fine-tuning: exact backward vs chained low-rank backward",
        "",
        f"CPU (scatterattn {scatterattn.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {date}; whole run took {result['elapsed_s']:.1f} s.",
        "Generated by `python bench/lora_finetune.py`.",
        "",
        "## Settings",
        "",
        settings_text(result),
        "",
        "## Results",
        "",
        format_table(result),
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary_lines(result)],
        "",
        "## Logit bounds of the pre-trained model (fine-tuning batch, per (batch, head) group)",
        "",
        bounds_table(result),
        "",
    ])


def write_plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG", file=sys.stderr)
        return False
    cfg = result["config"]
    modes = cfg["modes"]
    colors = {"exact": "black", "chained": "tab:blue", "chained-nofallback": "tab:red"}
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7.5), squeeze=False, constrained_layout=True,
                             gridspec_kw={"height_ratios": [3, 1.2]})
    for j, mode in enumerate(modes):
        ax, axf = axes[0, j], axes[1, j]
        for r in result["runs"]:
            if r["mode"] != mode:
                continue
            c = colors.get(r["method"], None)
            ax.plot(range(len(r["losses"])), r["losses"], color=c, alpha=0.35, linewidth=0.8)
            xs, ys = zip(*r["eval_losses"])
            label = r["method"]
            if r["fallback_fraction"] is not None:
                label += f" (fallback {100 * r['fallback_fraction']:.0f}%)"
            if r["stopped_at"] is not None:
                label += f", NaN grad at step {r['stopped_at']}"
            style = dict(linestyle="--", linewidth=2.2, zorder=5, marker="s", markersize=4) if r["method"] == "exact" \
                else dict(linewidth=1.6, marker="o", markersize=3)
            ax.plot(xs, ys, color=c, label=label, **style)
            if r["stopped_at"] is not None:
                ax.plot([xs[-1]], [ys[-1]], marker="X", markersize=11, color=c)
            if r["fallback_curve"]:
                axf.plot(range(len(r["fallback_curve"])), [100 * f for f in r["fallback_curve"]], color=c,
                         label=r["method"])
        ax.set_yscale("log")
        ax.set_title(f"{mode} LoRA ({'W_Q, W_V' if mode == 'partial' else 'W_Q, W_K, W_V'})", fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("loss (thin: train batch, markers: fixed eval batch)")
        ax.text(0.02, 0.02, "a chained run that falls back 100% is the exact backward:\nits curve lies under the dashed exact one",
                transform=ax.transAxes, fontsize=7, color="dimgray", va="bottom")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        axf.set_ylim(-5, 105)
        axf.set_xlabel("fine-tuning step")
        axf.set_ylabel("fallback % of groups")
        axf.grid(True, alpha=0.3)
        axf.legend(fontsize=8)
    fig.suptitle(
        f"LoRA fine-tuning, exact vs chained backward (m={cfg['num_features']}, threshold {cfg['threshold']:g} / None; "
        f"{cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads; task period {cfg['period']}, "
        f"shift {cfg['pretrain_shift']} -> {cfg['shift']})",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict, out_dir) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / "lora_finetune.md"
    md_path.write_text(format_markdown(result))
    written = {"md": md_path}
    png_path = out_dir / "lora_finetune.png"
    if write_plot(result, png_path):
        written["png"] = png_path
    return written


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (~20 s); prints only unless --out-dir")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 120; quick 30)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 400; quick 150)")
    p.add_argument("--num-features", type=int, default=None, help="random features m (default 64)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"threshold of the 'chained' method (default DEFAULT_THRESHOLD = {lora.DEFAULT_THRESHOLD:g})")
    p.add_argument("--redraw-interval", type=int, default=None, help="feature redraw interval (default 1; 0 never)")
    p.add_argument("--period", type=int, default=None, help="fine-tuning period (default 8)")
    p.add_argument("--shift", type=int, default=None, help="fine-tuning shift (default 1)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write (default {DEFAULT_OUT_DIR})")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = default_config(args.quick)
    for key, value in [("steps", args.steps), ("pretrain_steps", args.pretrain_steps),
                       ("num_features", args.num_features), ("threshold", args.threshold),
                       ("redraw_interval", args.redraw_interval), ("period", args.period), ("shift", args.shift),
                       ("modes", args.modes), ("methods", args.methods), ("seed", args.seed)]:
        if value is not None:
            cfg[key] = value
    if args.no_write:
        out_dir = None
    elif args.out_dir is not None:
        out_dir = args.out_dir
    else:
        out_dir = None if args.quick else DEFAULT_OUT_DIR
    result = run(cfg, out_dir=None, verbose=args.verbose)
    written = write_outputs(result, out_dir) if out_dir is not None else {}
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; took {result['elapsed_s']:.1f} s")
    print(settings_text(result))
    print()
    print(format_table(result))
    print()
    for line in summary_lines(result):
        print(line)
    print()
    print(bounds_table(result))
    if written:
        print("wrote " + " and ".join(str(p) for p in written.values()))
    return result


if __name__ == "__main__":
    main()
