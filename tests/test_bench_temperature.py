"""Tests for bench/temperature.py (the softmax-temperature error sweep) on a tiny configuration."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "bench" / "temperature.py"

# Tiny config. With the bench's seeding, these three temperatures give, over data seeds 0..19:
# at T = 0.01 Performer - LSH-only >= 0.27 on every seed, at T = 100 LSH-only - Performer >= 1.68.
N, D, BUDGET = 128, 16, 32
TEMPERATURES = (0.01, 1.0, 100.0)
SEEDS = (0,)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_temperature", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def rows(bench):
    return bench.run_sweep(n=N, d=D, budget=BUDGET, seeds=SEEDS, temperatures=TEMPERATURES)


def test_rows_shape_and_settings(bench, rows):
    assert [r["temperature"] for r in rows] == sorted(TEMPERATURES)
    for r in rows:
        assert r["scale"] == pytest.approx(1.0 / (r["temperature"] * math.sqrt(D)))
        assert (r["budget"], r["sb_features"], r["sb_bucket"]) == (BUDGET, BUDGET // 2, BUDGET // 2)
        assert r["sb_features"] + r["sb_bucket"] == r["budget"]
        assert r["best"] == min(bench.METHODS, key=lambda m: r[f"{m}_attn"])
        assert r["sb_beats_both"] == (r["scatterbrain_attn"] < min(r["performer_attn"], r["lsh_attn"]))


def test_errors_finite_and_bounded(bench, rows):
    # Provable bound: rows of A^ and A are probability vectors, so ||A^||_F <= sqrt(N) and
    # ||A||_F >= sqrt(N / S); hence ||A^ - A||_F / ||A||_F <= 1 + sqrt(S). (Not 2: LSH-only on flat
    # attention alone reaches sqrt(S/c - 1), and Performer at T ~ 1 exceeds 2 on some seeds.)
    bound = 1 + math.sqrt(N)
    for r in rows:
        for m in bench.METHODS:
            for key in (f"{m}_attn", f"{m}_out"):
                assert math.isfinite(r[key]) and r[key] >= 0, (key, r[key])
            assert r[f"{m}_attn"] <= bound, (m, r["temperature"], r[f"{m}_attn"])
            assert r[f"{m}_attn_std"] == 0.0  # one seed


def test_paper_premise_low_rank_flat_sparse_peaked(rows):
    peaked, flat = rows[0], rows[-1]
    # Flat attention: low-rank wins, and by a lot.
    assert flat["performer_attn"] < flat["lsh_attn"]
    assert flat["performer_attn"] < 0.1
    # Peaked attention: sparse wins.
    assert peaked["lsh_attn"] < peaked["performer_attn"]


def test_lsh_flat_limit_closed_form(rows):
    # T -> inf: A = 1/S everywhere, LSH-only puts 1/c on c keys per row -> error sqrt(S/c - 1).
    flat = rows[-1]
    assert flat["lsh_attn"] == pytest.approx(math.sqrt(N / BUDGET - 1), rel=1e-2)


def test_writes_nothing_unless_asked(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_write(*args, **kwargs):
        raise AssertionError("run_sweep wrote output without an out_dir")

    monkeypatch.setattr(bench, "write_outputs", no_write)
    bench.run_sweep(n=64, d=8, budget=16, seeds=(0,), temperatures=(0.1, 10.0))
    assert list(tmp_path.iterdir()) == []


def test_writes_md_and_png_when_asked(bench, tmp_path):
    out = tmp_path / "out"
    rows = bench.run_sweep(n=N, d=D, budget=BUDGET, seeds=(0, 1), temperatures=TEMPERATURES, out_dir=out)
    md = (out / "temperature.md").read_text()
    assert "| T | scale | Performer | LSH-only | Scatterbrain | best |" in md
    for r in rows:
        assert f"| {r['temperature']:.3g} |" in md
    assert "CPU reference" in md and "torch" in md
    assert "m' = 16 features + c' = 16 keys" in md
    assert bench.summary_line(rows) in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "temperature.png").exists()
    else:
        assert (out / "temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_quick_cli(bench, tmp_path, capsys):
    rows = bench.main(["--quick", "--num-t", "3", "--seeds", "0", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert len(rows) == 3
    assert "| T | scale | Performer | LSH-only | Scatterbrain |" in printed
    assert "Scatterbrain beats" in printed
    assert (tmp_path / "temperature.md").exists()


def test_budget_split_validation(bench):
    assert bench.budget_split(64) == (32, 32)
    assert bench.budget_split(64, 48) == (48, 16)
    with pytest.raises(ValueError):
        bench.budget_split(64, 64)
    with pytest.raises(ValueError):
        bench.budget_split(1)
