"""Register pressure of the Scatterbrain and chained-gradient kernels per launch configuration,
without a GPU.

Each configuration of the forward and backward-dq sparse + low-rank kernels (BLOCK_Q query rows per
program, out of a tile of 128 for buckets of 128; BLOCK_K keys per inner step; BLOCK_F features per
feature step; num_warps) and of the backward-dk/dv kernel (BLOCK_K keys per program, BLOCK_Q
queries per inner step) is compiled with Triton's real compiler for sm_90 (H100/H200) on the CPU, and the cubin's
registers per thread and spill stack (bytes per thread of local memory; 0 = no spills) are read with
cuobjdump (`scatterattn.kernels.offline_compile`). Launches are recorded at N = 1024 so that the
JIT's specialisation (divisibility by 16 of sizes and strides, which decides vectorised loads) is
the one of the benchmark's sequence lengths. The chained-gradient Kronecker kernels (BLOCK_N rows,
BLOCK_M features per dot, bf16 operands) get the same treatment. Spills turn register traffic into memory traffic
inside the innermost loops, so a spill-free configuration is the starting point for GPU tuning; this
is a proxy, not a timing: on a GPU, `bench/kernels.py` decides.

    python bench/kernel_resources.py                 # bf16, D 64 and 128; writes bench/results/
    python bench/kernel_resources.py --quick         # D 64, a few configurations, prints only
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, before triton is imported

import torch  # noqa: E402

SM90_SHARED_KIB = 227
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FWD = "sparse_lowrank_fwd_kernel"
BWD_DQ, BWD_DKDV = "sparse_lowrank_bwd_dq_kernel", "sparse_lowrank_bwd_dkdv_kernel"
FULL_FWD, FULL_DQ, FULL_DKDV = "full_tile_fwd_kernel", "full_tile_bwd_dq_kernel", "full_tile_bwd_dkdv_kernel"
GRAM, ROWS = "kron_gram_kernel", "kron_rows_kernel"
FULL_TILE_MAX_DIM = 64  # KernelTiles.full_tiles
RECORD_N = 1024
FWD_GRID = {"block_q": (64, 128), "block_k": (32, 64, 128), "block_f": (16, 32), "num_warps": (4, 8)}
DQ_GRID = {"block_q": (32, 64, 128), "block_k": (32, 64, 128), "block_f": (16, 32), "num_warps": (4, 8)}
# dk/dv: BLOCK_K keys per program, query chunks of BLOCK_Q
DKDV_GRID = {"block_q": (16, 32, 64), "block_k": (32, 64, 128), "block_f": (16, 32), "num_warps": (4, 8)}
FULL_GRID = {"block_q": (64, 128), "block_k": (64, 128), "block_f": (16, 32, 64), "num_warps": (4, 8)}
FULL_DKDV_GRID = {"block_q": (16, 32, 64), "block_k": (64, 128), "block_f": (16, 32, 64), "num_warps": (4, 8)}
QUICK_FWD = {"block_q": (64, 128), "block_k": (64,), "block_f": (32,), "num_warps": (8,)}
QUICK_DQ = {"block_q": (64, 128), "block_k": (64,), "block_f": (32,), "num_warps": (8,)}
QUICK_DKDV = {"block_q": (32, 64), "block_k": (128,), "block_f": (32,), "num_warps": (8,)}
CHAINED_GRID = {"block_n": (32, 64, 128), "block_m": (128, 256), "num_warps": (4, 8)}
QUICK_CHAINED = {"block_n": (64,), "block_m": (128, 256), "num_warps": (8,)}


def configs(grid):
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def measure(kernel: str, dim: int, dtype, case: str, config: dict, defaults: bool = False) -> dict:
    """Compile `kernel` as the launchers launch it with `config` (launcher keyword arguments)."""
    from scatterattn.kernels import offline_compile as oc

    if kernel in (GRAM, ROWS):
        recorders = oc.record_chained(dtype, n=RECORD_N, dim=dim, **config)
    else:
        launch = tuple(config[k] for k in ("block_q", "block_k", "block_f", "num_warps")) if config else None
        extra = {FWD: {"forward": config}, FULL_FWD: {"forward": config},
                 BWD_DQ: {"backward": {"dq_launch": launch}}, FULL_DQ: {"backward": {"dq_launch": launch}},
                 BWD_DKDV: {"backward": {"dkdv_launch": launch}}, FULL_DKDV: {"backward": {"dkdv_launch": launch}}}
        # one LSH round runs the full-tile kernels; the per-pair ones are compiled as round 0 of two
        case = case if kernel.startswith("full_tile") else "lsh-2-rounds"
        recorders = oc.record_scatterbrain(dtype, oc.SCATTERBRAIN_CASES[case], dim=dim, n=RECORD_N,
                                           **({} if defaults else extra[kernel]))
    (result,) = oc.compile_all({kernel: recorders[kernel]}, usage=True)[:1]
    return {"kernel": kernel, "dim": dim, **config, "defaults": defaults, **result}


def run(dims, grids, dtype=torch.bfloat16, case="lsh"):
    rows = []
    for dim in dims:
        for kernel, grid in grids.items():
            if kernel.startswith("full_tile") and dim > FULL_TILE_MAX_DIM:
                continue
            rows.append(measure(kernel, dim, dtype, case, {}, defaults=True))
            for config in configs(grid):
                start = time.perf_counter()
                row = measure(kernel, dim, dtype, case, config)
                row["compile_s"] = time.perf_counter() - start
                rows.append(row)
                print(f"{kernel:26s} D={dim:3d} {config} regs={row['registers']} spill={row['spill_stack']}",
                      flush=True)
    return rows


def format_markdown(rows, *, title_note: str) -> str:
    import triton

    lines = [
        "# Register pressure of the Scatterbrain and chained-gradient kernels (sm_90, offline compile)",
        "",
        f"{title_note}; torch {torch.__version__}, triton {triton.__version__}, compiled for sm_90 on the CPU "
        "(no GPU). Generated by `python bench/kernel_resources.py`.",
        "",
        f"Scatterbrain: bf16, N = {RECORD_N}, m = 256 features, LSH buckets of 128 (query tiles of 128 rows, "
        "split into sub-blocks of BLOCK_Q). The full-tile kernels (one LSH round, head dims <= 64) are "
        "compiled for one round; the per-pair kernels (local windows, several rounds, head dims > 64) for "
        "round 0 of two. Chained gradient: bf16 inputs (bf16 dot operands), "
        f"N = {RECORD_N}, m = 256, E = D. Launches are specialised as the JIT specialises them. `spill` = "
        "spill stack in bytes per thread (0 = no spills); registers are capped at 255 per thread. "
        "`(launcher default)` rows are what the launchers choose today. The dk/dv kernel's BLOCK_K is its keys "
        "per program, BLOCK_Q its query chunk. Shared memory above "
        f"{SM90_SHARED_KIB} KiB cannot launch on sm_90. `HGMMA / HMMA`: matrix instructions in the SASS, "
        "Hopper's warpgroup MMA / the older warp-level MMA (slower on Hopper; Triton emits it for dots "
        "with fewer than 64 rows per warpgroup).",
        "",
    ]
    blocks = {FULL_FWD: ("BLOCK_Q", "BLOCK_K", "BLOCK_F"), FULL_DQ: ("BLOCK_Q", "BLOCK_K", "BLOCK_F"),
              FULL_DKDV: ("BLOCK_Q", "BLOCK_K", "BLOCK_F"),
              FWD: ("BLOCK_Q", "BLOCK_K", "BLOCK_F"), BWD_DQ: ("BLOCK_Q", "BLOCK_K", "BLOCK_F"),
              BWD_DKDV: ("BLOCK_Q", "BLOCK_K", "BLOCK_F"),
              GRAM: ("BLOCK_N", "BLOCK_M"), ROWS: ("BLOCK_N", "BLOCK_M")}
    for kernel, names in blocks.items():
        for dim in sorted({r["dim"] for r in rows}):
            sel = [r for r in rows if r["kernel"] == kernel and r["dim"] == dim]
            if not sel:
                continue
            columns = [*names, "num_warps", "registers", "spill (B/thread)", "shared (KiB)", "HGMMA / HMMA"]
            lines += [f"## {kernel}, {'D = E' if kernel in (GRAM, ROWS) else 'D'} = {dim}", "",
                      "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for r in sel:
                cells = [str(r["blocks"][name]) for name in names]
                cells[0] += " (launcher default)" if r["defaults"] else ""
                cells += [str(r["num_warps"]), str(r["registers"]), str(r["spill_stack"]), f"{r['shared'] / 1024:.0f}",
                          f"{r['hgmma']} / {r['hmma']}"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--quick", action="store_true", help="D 64, a few configurations, prints only")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"default {DEFAULT_OUT} (not with --quick)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        rows = run([64], {FULL_FWD: QUICK_FWD, FULL_DQ: QUICK_DQ, FULL_DKDV: QUICK_DKDV, FWD: QUICK_FWD,
                          BWD_DQ: QUICK_DQ, BWD_DKDV: QUICK_DKDV, GRAM: QUICK_CHAINED, ROWS: QUICK_CHAINED})
    else:
        rows = run(args.dims, {FULL_FWD: FULL_GRID, FULL_DQ: FULL_GRID, FULL_DKDV: FULL_DKDV_GRID, FWD: FWD_GRID,
                               BWD_DQ: DQ_GRID, BWD_DKDV: DKDV_GRID, GRAM: CHAINED_GRID, ROWS: CHAINED_GRID})
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = format_markdown(rows, title_note=f"{stamp}, {time.perf_counter() - start:.0f} s")
    print(text)
    out_dir = args.out_dir or (None if args.quick else DEFAULT_OUT)
    if out_dir is not None:
        import triton

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"kernel_resources_triton{triton.__version__}.md"
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
