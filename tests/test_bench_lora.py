"""Smoke tests of the chained-gradient benchmarks (bench/phase_transition.py, bench/lora_finetune.py,
bench/lora_backward.py) on tiny settings; bench/ is not a package, so the scripts are loaded by path."""

from __future__ import annotations

import datetime
import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ phase transition


@pytest.fixture(scope="module")
def phase():
    return _load("phase_transition")


@pytest.fixture(scope="module")
def phase_rows(phase):
    return phase.run_sweep(n=64, d=16, heads=2, features=(64, 16), bounds=(0.1, 1.0, 30.0), seeds=(0,))


def test_phase_errors_finite_and_grow_with_the_logit_range(phase, phase_rows):
    assert [r["m"] for r in phase_rows] == [64] * 3 + [16] * 3
    for m in (64, 16):
        rs = [r for r in phase_rows if r["m"] == m]
        assert [r["target"] for r in rs] == [0.1, 1.0, 30.0]
        for r in rs:
            assert r["bound"] == pytest.approx(r["target"], rel=1e-6)  # gamma hits it (logit_bound is float32)
            assert 0 < r["smax"] <= r["bound"] * (1 + 1e-6)  # the bound bounds the logits
            for g in phase.GRADS:
                assert math.isfinite(r[f"{g}_err"]) and r[f"{g}_err"] > 0
                assert -1 <= r[f"{g}_cos"] <= 1
        for g in phase.GRADS:
            assert rs[0][f"{g}_err"] < rs[-1][f"{g}_err"], (m, g)
            assert rs[0][f"{g}_err"] < 0.1 and rs[0][f"{g}_cos"] > 0.99  # bounded logits: accurate
            assert rs[0][f"{g}_cos"] > rs[-1][f"{g}_cos"]


def test_phase_more_features_help_at_small_logits(phase_rows):
    small = {r["m"]: r["worst_err"] for r in phase_rows if r["target"] == 0.1}
    assert small[64] < small[16]


def test_phase_crossing_interpolation(phase):
    rows = [{"m": 8, "bound": b, "worst_err": e} for b, e in [(1.0, 0.05), (10.0, 0.5), (100.0, 2.0)]]
    value, kind = phase.crossing(rows, 8, 0.1)
    assert kind == "at" and 1.0 < value < 10.0
    # log-log interpolation: 0.1 is at fraction log(2)/log(10) of the way from 1 to 10
    assert value == pytest.approx(10 ** (math.log(2) / math.log(10)))
    assert phase.crossing(rows, 8, 0.01) == (1.0, "below")
    assert phase.crossing(rows, 8, 5.0) == (100.0, "above")
    assert phase.error_at(rows, 8, 10.0) == pytest.approx(0.5)
    assert phase.error_at(rows, 8, 1000.0) is None


def test_phase_writes_md_and_png(phase, phase_rows, tmp_path):
    written = phase.write_outputs(phase_rows, tmp_path, seeds=(0,))
    md = written["md"].read_text()
    assert "| logit bound | median group bound | max abs s_ij |" in md
    assert f"torch {torch.__version__}" in md and "## m = 64" in md and "## m = 16" in md
    assert f"package default threshold = {phase.lora.DEFAULT_THRESHOLD:g}" in md
    if _has_matplotlib():
        assert written["png"].read_bytes()[:8] == PNG_MAGIC


# -------------------------------------------------------------------------------------------- finetune


TINY_FT = dict(
    vocab=16, d_model=32, heads=2, layers=1, seq_len=24, batch=8, eval_batch=16,
    pretrain_period=4, pretrain_shift=0, pretrain_steps=40, period=4, shift=1, steps=12, lr=1e-2,
    rank=4, alpha=8, eval_every=4, num_features=16, threshold=1e-6, redraw_interval=1, seed=0,
)


@pytest.fixture(scope="module")
def finetune():
    return _load("lora_finetune")


@pytest.fixture(scope="module")
def ft_result(finetune):
    return finetune.run(dict(TINY_FT))


def test_finetune_losses_decrease_for_every_method(finetune, ft_result):
    runs = ft_result["runs"]
    assert {(r["mode"], r["method"]) for r in runs} == {(m, k) for m in finetune.MODES for k in finetune.METHODS}
    for r in runs:
        assert len(r["losses"]) == TINY_FT["steps"]
        assert all(math.isfinite(x) for x in r["losses"])
        first, last = r["eval_losses"][0][1], r["eval_losses"][-1][1]
        assert last < first, (r["mode"], r["method"], r["eval_losses"])
        assert r["losses"][-1] < r["losses"][0], (r["mode"], r["method"])
        trainable = r["trainable"]
        n_targets = 2 if r["mode"] == "partial" else 3
        assert trainable == n_targets * TINY_FT["layers"] * TINY_FT["rank"] * 2 * TINY_FT["d_model"]


def test_finetune_fallback_accounting(ft_result):
    groups = TINY_FT["steps"] * TINY_FT["batch"] * TINY_FT["heads"] * TINY_FT["layers"]
    by = {(r["mode"], r["method"]): r for r in ft_result["runs"]}
    for mode in ("partial", "full"):
        exact, fallback, approx = by[(mode, "exact")], by[(mode, "chained")], by[(mode, "chained-nofallback")]
        assert exact["fallback_fraction"] is None
        # threshold 1e-6: every group falls back, so the run is the exact backward
        assert (fallback["approximate"], fallback["fallback"]) == (0, groups)
        assert fallback["losses"] == pytest.approx(exact["losses"], rel=1e-4, abs=1e-5)
        assert fallback["grad_cos"] == pytest.approx(1.0, abs=1e-5)
        # threshold None: nothing falls back, the gradient is approximate (close, not equal)
        assert (approx["approximate"], approx["fallback"]) == (groups, 0)
        assert approx["losses"][1:] != pytest.approx(exact["losses"][1:], rel=1e-6)
        assert -1.0 <= approx["grad_cos"] < 1.0 - 1e-6


def test_finetune_table_and_outputs(finetune, ft_result, tmp_path):
    table = finetune.format_table(ft_result)
    for method in finetune.METHODS:
        assert f"| partial | {method} |" in table and f"| full | {method} |" in table
    assert "fallback %" in table and "ms / step" in table
    written = finetune.write_outputs(ft_result, tmp_path)
    md = written["md"].read_text()
    assert table in md and "this run is (almost) the exact backward" in md
    if _has_matplotlib():
        assert written["png"].read_bytes()[:8] == PNG_MAGIC


def test_finetune_data_is_the_shifted_copy(finetune):
    tokens, mask = finetune.make_batch(3, 11, 16, 4, 1, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 11) and mask.shape == (3, 10)
    assert torch.equal(tokens[:, 4:8], (tokens[:, :4] + 1) % 16)
    assert torch.equal(tokens[:, 8:], (tokens[:, 4:7] + 1) % 16)
    assert not mask[:, :3].any() and mask[:, 3:].all()


# -------------------------------------------------------------------------------------------- backward


@pytest.fixture(scope="module")
def backward():
    return _load("lora_backward")


def test_backward_cpu_smoke(backward, tmp_path, capsys):
    argv = ["--device", "cpu", "--seq-lens", "32", "64", "--heads", "2", "--head-dim", "16", "--features", "16",
            "--repeats", "1", "--out", str(tmp_path)]
    rows = backward.main(argv)
    assert [(r["n"], r["method"]) for r in rows] == [(32, "exact"), (32, "chained"), (64, "exact"), (64, "chained")]
    for r in rows:
        assert "error" not in r, r
        for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert "peak_mib" not in r  # no memory column on the CPU
    for r in rows:
        if r["method"] == "chained":
            assert r["fallback"] == 0 and r["approximate"] > 0  # threshold=None: nothing fell back
    out = capsys.readouterr().out
    assert "| N | method | fwd ms | bwd ms | fwd+bwd ms |" in out and "CPU" in out
    path = tmp_path / f"lora-backward-{datetime.date.today().isoformat()}-cpu.md"
    assert path.read_text().strip() == out.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for --device cuda on a machine without CUDA")
def test_backward_cuda_flag_without_gpu(backward):
    with pytest.raises(SystemExit):
        backward.parse_args(["--device", "cuda"])
