"""How far a Hugging Face encoder's outputs move when its attention is swapped for Scatterbrain.

A tiny randomly initialised BERT (built from a config: nothing is downloaded) runs a padded batch with
exact attention ("sdpa"), then with Performer (low-rank only), LSH (sparse only) and Scatterbrain
(both) at several budgets, swapped in with `scatterattn.integrations.swap_attention`. Reported per
setting: the relative error of the first layer's attention output (the approximation itself) and of
the last hidden state (after every layer, residuals and layer norms), on real tokens only.

The budget is what each query pays for: `bucket_size * n_hashes` exact keys plus `num_features`
random features (Scatterbrain's memory is about `N * (bucket + features)` per head).

Randomly initialised attention is nearly uniform (logits ~ 0), which low-rank methods approximate
well; `--sharpness` multiplies the query and key weights, as training tends to do, to show the
regime where the sparse part matters. The default runs both.

    python examples/hf_encoder_budget.py            # ~25 s on 2 CPU cores
    python examples/hf_encoder_budget.py --quick    # ~10 s
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch

from scatterattn import ScatterbrainConfig
from scatterattn.integrations import ensure_torchvision_importable, restore_attention, swap_attention

ensure_torchvision_importable()  # only acts when an installed torchvision cannot load its operators
from transformers import BertConfig, BertModel  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def build(args) -> BertModel:
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=args.seq_len,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def sharpen(model: BertModel, factor: float) -> None:
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(factor ** 0.5)
            layer.attention.self.key.weight.mul_(factor ** 0.5)


def settings(budgets: list[int]) -> list[tuple[str, int, ScatterbrainConfig]]:
    rows = []
    for budget in budgets:
        rows.append(("performer", budget, ScatterbrainConfig(num_features=budget, sparse="none")))
        rows.append(("lsh", budget, ScatterbrainConfig(num_features=0, bucket_size=budget)))
        rows.append(("scatterbrain", budget, ScatterbrainConfig(num_features=budget // 2, bucket_size=budget // 2)))
    return rows


def run(model, ids, mask):
    captured = {}
    attn = model.encoder.layer[0].attention.self
    handle = attn.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", out[0].detach()))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    handle.remove()
    return captured["attn"], hidden


def rel(a, b, real):
    return float((a[real] - b[real]).norm() / b[real].norm())


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and sequence, two budgets")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 8.0, 64.0],
                        help="factors multiplying q.k (1 = as initialised)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "hf_encoder_budget.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.batch, args.hidden, args.layers, args.budgets = 128, 2, 64, 2, [16, 32]
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, 1000, (args.batch, args.seq_len), generator=gen)
    mask = torch.ones(args.batch, args.seq_len, dtype=torch.long)
    for b in range(1, args.batch):  # right padding: 0%, 12.5%, 25%, ... of each sequence
        mask[b, args.seq_len - args.seq_len * b // 8:] = 0
    real = mask.bool()

    lines = [
        "# Scatterbrain in a randomly initialised BERT encoder: error against exact attention",
        "",
        f"BERT: hidden {args.hidden}, {args.layers} layers, {args.heads} heads (head dim {args.hidden // args.heads}), "
        f"batch {args.batch} x {args.seq_len} tokens, right-padded; float32, CPU reference backend.",
        "Budget b: performer = b random features; lsh = buckets of b keys; scatterbrain = b/2 features + buckets of "
        "b/2 keys. Errors are relative Frobenius norms over real tokens: `attn` = first layer's attention output, "
        "`last` = last hidden state. `time` = one forward of the whole batch, a single wall-clock measurement "
        "(indicative only; the reference backend is not tuned for speed).",
        "",
    ]
    for factor in args.sharpness:
        model = build(args)
        if factor != 1.0:
            sharpen(model, factor)
        start = time.perf_counter()
        dense_attn, dense_hidden = run(model, ids, mask)
        dense_time = time.perf_counter() - start
        lines += [f"## q.k sharpness x{factor:g}", "",
                  "| method | budget | attn rel. error | last rel. error | time (s) |", "|---|---:|---:|---:|---:|",
                  f"| dense (sdpa) | {args.seq_len} | 0 | 0 | {dense_time:.2f} |"]
        for method, budget, config in settings(args.budgets):
            swap_attention(model, config, seed=args.seed)
            start = time.perf_counter()
            attn, hidden = run(model, ids, mask)
            elapsed = time.perf_counter() - start
            restore_attention(model)
            lines.append(
                f"| {method} | {budget} | {rel(attn, dense_attn, real):.4f} | {rel(hidden, dense_hidden, real):.4f} "
                f"| {elapsed:.2f} |"
            )
            print(lines[-1], flush=True)
        # Keep the first layer exact (a common recipe): how much of the error was that layer's?
        swap_attention(model, ScatterbrainConfig(num_features=args.budgets[-1] // 2, bucket_size=args.budgets[-1] // 2),
                       per_layer={0: "exact"}, seed=args.seed)
        attn, hidden = run(model, ids, mask)
        restore_attention(model)
        lines.append(f"| scatterbrain, layer 0 exact | {args.budgets[-1]} | {rel(attn, dense_attn, real):.4f} | "
                     f"{rel(hidden, dense_hidden, real):.4f} | |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
