"""Train a small ViT and a small causal LM from scratch with dense, Performer, LSH and Scatterbrain attention.

Both tasks are synthetic and generated on the fly (fresh samples every step, a fixed evaluation set):

* ViT, "brighter blob": a 32x32 noisy image holds two Gaussian blobs, a bright one and a dimmer one,
  in different quadrants; the class is the quadrant of the bright one. Patches of 4x4 give 64 tokens
  plus a class token. The ViT uses `ScatterbrainTimmAttention` (timm's Attention layout; timm itself is
  not needed), one setting per run.
* causal LM, "copy": ``[BOS] x_1..x_T [SEP] x_1..x_T``; the loss and the accuracy are taken on the second
  copy, which needs attention to the token T + 1 positions back (an induction / copying head). The model
  is a tiny randomly initialised Hugging Face Llama (grouped-query heads) switched between
  ``attn_implementation="sdpa"`` (dense) and "scatterbrain" with `scatterattn.integrations.hf.configure`.

Attention settings at budget b per query: performer = b random features; lsh = buckets of b keys, no
features; scatterbrain = b/2 features + buckets of b/2 keys; dense = exact softmax. Every run of a task
starts from the same initial weights and sees the same data.

    python examples/train_small_models.py           # default: about 2 minutes on 2 idle CPU cores
    python examples/train_small_models.py --quick   # about 30 s: a smoke run (its ViT runs too few
                                                    # steps to get past the majority class, 0.359)

Writes examples/results/train_small_models.{png,md} and prints the table.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from scatterattn import ScatterbrainConfig  # noqa: E402
from scatterattn.integrations import ScatterbrainTimmAttention, ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # only acts when an installed torchvision cannot load its operators
import scatterattn.integrations.hf as sb_hf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
METHODS = ("dense", "performer", "lsh", "scatterbrain")


def attention_setting(method: str, budget: int):
    if method == "dense":
        return "exact"
    if method == "performer":
        return ScatterbrainConfig(num_features=budget, sparse="none")
    if method == "lsh":
        return ScatterbrainConfig(num_features=0, bucket_size=budget)
    if method == "scatterbrain":
        return ScatterbrainConfig(num_features=budget // 2, bucket_size=budget // 2)
    raise ValueError(method)


def median_step(times: list[float]) -> float:
    """Median seconds per training step, leaving out the first steps (warm-up)."""
    kept = sorted(times[3:] or times)
    return kept[len(kept) // 2]


# ------------------------------------------------------------------------------------------------
# ViT on "brighter blob"


def blob_images(n: int, gen: torch.Generator, size: int = 32, noise: float = 0.5):
    """(n, 3, size, size) images and the quadrant (0..3) of the brighter of two blobs."""
    half = size // 2
    label = torch.randint(0, 4, (n,), generator=gen)
    other = (label + torch.randint(1, 4, (n,), generator=gen)) % 4  # a different quadrant
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = noise * torch.randn(n, 3, size, size, generator=gen)
    for quadrant, amplitude in ((label, 2.0), (other, 1.0)):
        cy = (quadrant // 2) * half + 3 + torch.rand(n, generator=gen) * (half - 6)
        cx = (quadrant % 2) * half + 3 + torch.rand(n, generator=gen) * (half - 6)
        blob = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * 2.0**2))
        images += amplitude * blob[:, None]
    return images, label


class Block(nn.Module):
    def __init__(self, dim, heads, setting, seed):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ScatterbrainTimmAttention(dim, num_heads=heads, qkv_bias=True, scatterbrain=setting, seed=seed)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    def __init__(self, setting, dim=64, depth=3, heads=4, patch=4, size=32, classes=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, setting, seed=i) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def train_vit(method, args):
    torch.manual_seed(args.seed)
    model = SmallViT(attention_setting(method, args.budget))
    # Same initial weights for every method: build once with the same seed; the random-feature draws
    # are buffers, not parameters, and do not consume the parameter RNG stream differently.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data_gen = torch.Generator().manual_seed(args.seed + 10)
    eval_x, eval_y = blob_images(args.eval_size, torch.Generator().manual_seed(args.seed + 20))
    curve, times = [], []
    for step in range(1, args.vit_steps + 1):
        start = time.perf_counter()
        model.train()
        x, y = blob_images(args.batch, data_gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        if step % args.eval_every == 0 or step == args.vit_steps:
            model.eval()
            with torch.no_grad():
                logits = model(eval_x)
            curve.append((step, float(F.cross_entropy(logits, eval_y)), float((logits.argmax(-1) == eval_y).float().mean())))
    return curve, median_step(times)


# ------------------------------------------------------------------------------------------------
# causal LM on "copy"

BOS, SEP, FIRST = 0, 1, 2


def copy_batch(n, length, vocab, gen):
    body = torch.randint(FIRST, vocab, (n, length), generator=gen)
    ids = torch.cat([torch.full((n, 1), BOS), body, torch.full((n, 1), SEP), body], dim=1)
    labels = ids.clone()
    labels[:, : length + 2] = -100  # score the second copy only
    return ids, labels


def train_lm(method, args):
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2 * args.copy_len + 2, attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    if method == "dense":
        model.set_attn_implementation("sdpa")
    else:
        sb_hf.configure(model, attention_setting(method, args.budget), seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data_gen = torch.Generator().manual_seed(args.seed + 30)
    eval_ids, eval_labels = copy_batch(args.eval_size // 2, args.copy_len, args.vocab, torch.Generator().manual_seed(args.seed + 40))
    curve, times = [], []
    for step in range(1, args.lm_steps + 1):
        start = time.perf_counter()
        model.train()
        ids, labels = copy_batch(args.batch, args.copy_len, args.vocab, data_gen)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
        if step % args.eval_every == 0 or step == args.lm_steps:
            model.eval()
            with torch.no_grad():
                out = model(input_ids=eval_ids, labels=eval_labels)
            predicted = out.logits[:, :-1].argmax(-1)
            target = eval_labels[:, 1:]
            scored = target != -100
            accuracy = float((predicted[scored] == target[scored]).float().mean())
            curve.append((step, float(out.loss), accuracy))
    return curve, median_step(times)


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps (about 30 s)")
    parser.add_argument("--vit-steps", type=int, default=500)
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budget", type=int, default=16, help="per-query budget (see the docstring)")
    parser.add_argument("--copy-len", type=int, default=31, help="T: the LM sequences have 2T + 2 tokens")
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these models are tiny, and spinning threads stall badly "
                             "when other processes share the cores)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "train_small_models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.vit_steps, args.lm_steps, args.eval_every, args.eval_size, args.batch = 200, 60, 20, 128, 16

    results = {}
    for task, train in (("vit", train_vit), ("lm", train_lm)):
        for method in args.methods:
            began = time.perf_counter()
            curve, step_time = train(method, args)
            wall = time.perf_counter() - began
            results[task, method] = (curve, step_time)
            step, loss, acc = curve[-1]
            print(f"{task:3s} {method:12s} step {step:4d}  eval loss {loss:.3f}  accuracy {acc:.3f}  "
                  f"{1000 * step_time:.0f} ms/step, {wall:.1f} s in all", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {
        "vit": f"ViT, brighter-blob quadrant (65 tokens), budget {args.budget}",
        "lm": f"Llama LM, copy task ({2 * args.copy_len + 2} tokens), budget {args.budget}",
    }
    for ax, task in zip(axes, ("vit", "lm")):
        for method in args.methods:
            curve, _ = results[task, method]
            ax.plot([c[0] for c in curve], [c[2] for c in curve], marker="o", markersize=3, label=method)
        ax.set_title(titles[task], fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("eval accuracy" + (" (second copy, per token)" if task == "lm" else ""))
        ax.set_ylim(0, 1.02)
        ax.axhline(0.25 if task == "vit" else 1 / (args.vocab - FIRST), color="grey", lw=0.8, ls=":", label="chance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    fig.savefig(png, dpi=110)

    lines = [
        "# Small models trained from scratch: dense, Performer, LSH and Scatterbrain attention",
        "",
        f"Budget {args.budget} per query (performer: {args.budget} features; lsh: buckets of {args.budget} keys; "
        f"scatterbrain: {args.budget // 2} features + buckets of {args.budget // 2} keys). Batch {args.batch}, "
        f"AdamW lr {args.lr}, seed {args.seed}, {args.threads} CPU thread(s), reference backend (dense: torch SDPA). "
        f"{'--quick run.' if args.quick else ''}",
        "",
        "| task | method | steps | eval loss | eval accuracy | ms / step (median) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (task, method), (curve, step_time) in results.items():
        step, loss, acc = curve[-1]
        lines.append(f"| {task} | {method} | {step} | {loss:.3f} | {acc:.3f} | {1000 * step_time:.0f} |")
    text = "\n".join(lines)
    print(text)
    args.out.with_suffix(".md").write_text(text + f"\n\n![curves]({png.name})\n")
    print(f"wrote {png} and {args.out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
