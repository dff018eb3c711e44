"""Smoke tests of the chained-gradient benchmarks (bench/phase_transition.py, bench/lora_finetune.py,
bench/lora_backward.py) on tiny settings; bench/ is not a package, so the scripts are loaded by path."""

from __future__ import annotations

import datetime
import importlib.util
import json
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


PHASE_SERIES = [(kind, method, m) for kind in ("gaussian", "clustered")
                for method, m in (("plain", 64), ("plain", 16), ("sparse-lsh", 16), ("sparse-local", 16))]


@pytest.fixture(scope="module")
def phase_rows(phase):
    return phase.run_sweep(n=64, d=16, heads=2, features=(64, 16), sparse_features=(16,), bounds=(0.1, 1.0, 30.0),
                           seeds=(0,), width=16)


def test_phase_rows_cover_every_data_method_and_m(phase, phase_rows):
    assert [(r["data"], r["method"], r["m"]) for r in phase_rows] == [s for s in PHASE_SERIES for _ in range(3)]
    assert phase._keys(phase_rows) == PHASE_SERIES
    for r in phase_rows:
        assert r["target"] in (0.1, 1.0, 30.0)
        assert r["width"] == (None if r["method"] == "plain" else 16)
        assert r["groups"] == 2  # B=1 x H=2 groups, one seed
        # threshold=0 sends every group to the sparse-corrected chain, threshold=None none of them
        assert r["sparse_groups"] == (0 if r["method"] == "plain" else r["groups"] - r["numeric_fallback"])
        if r["method"] == "plain":
            assert r["support_mass"] is None
        else:  # exact attention mass on 16 of 64 keys: about a quarter at small logits, a probability anyway
            assert 0 < r["support_mass"] < 1
            if r["target"] == 0.1:
                assert r["support_mass"] == pytest.approx(0.25, abs=0.05)


def test_phase_sparse_methods_on_a_subset_of_bounds(phase):
    rows = phase.run_sweep(n=32, d=8, heads=1, features=(8,), bounds=(0.1, 1.0, 10.0), sparse_bounds=(0.1, 10.0),
                           seeds=(0,), data=("gaussian",), methods=("plain", "sparse-local"), width=8)
    assert [(r["method"], r["target"]) for r in rows] == [("plain", 0.1), ("plain", 1.0), ("plain", 10.0),
                                                          ("sparse-local", 0.1), ("sparse-local", 10.0)]
    table = phase.comparison_table(rows, "gaussian").splitlines()
    assert len(table) == 2 + 3 and table[3].startswith("| 1 |") and table[3].endswith("|  |")  # plain-only bound
    with pytest.raises(ValueError):
        phase.run_sweep(n=32, d=8, heads=1, features=(8,), bounds=(0.1, 1.0), sparse_bounds=(0.5,), seeds=(0,))


def test_phase_errors_finite_and_grow_with_the_logit_range(phase, phase_rows):
    for kind, method, m in PHASE_SERIES:
        rs = phase._series(phase_rows, m, kind, method)
        assert [r["target"] for r in rs] == [0.1, 1.0, 30.0]
        for r in rs:
            assert r["bound"] == pytest.approx(r["target"], rel=1e-6)  # gamma hits it (logit_bound is float32)
            assert 0 < r["smax"] <= r["bound"] * (1 + 1e-6)  # the bound bounds the logits
            for g in phase.GRADS:
                assert math.isfinite(r[f"{g}_err"]) and r[f"{g}_err"] > 0
                assert -1 <= r[f"{g}_cos"] <= 1
        for g in phase.GRADS:
            assert rs[0][f"{g}_err"] < rs[-1][f"{g}_err"], (kind, method, m, g)
            assert rs[0][f"{g}_cos"] > rs[-1][f"{g}_cos"]
            if method == "plain":
                assert rs[0][f"{g}_err"] < 0.1 and rs[0][f"{g}_cos"] > 0.99  # bounded logits: accurate


def test_phase_more_features_help_at_small_logits(phase, phase_rows):
    for kind in ("gaussian", "clustered"):
        small = {r["m"]: r["worst_err"] for r in phase._series(phase_rows, 64, kind, "plain")
                 + phase._series(phase_rows, 16, kind, "plain") if r["target"] == 0.1}
        assert small[64] < small[16], kind


def test_phase_plain_chain_is_performers_matrix(phase_rows):
    # dv = f~^T dO of the plain chain equals autograd through scatterbrain_attention(sparse='none')
    checks = [r["check"] for r in phase_rows if r["method"] == "plain" and r["check"] is not None]
    assert checks and max(checks) < 1e-9


@pytest.mark.parametrize("method", ["sparse-lsh", "sparse-local"])
def test_phase_sparse_chain_is_scatterbrains_matrix(phase_rows, method):
    checks = [r["check"] for r in phase_rows if r["method"] == method and r["check"] is not None]
    assert checks and max(checks) < 1e-9


def test_phase_clustered_data_shares_centres(phase):
    q, k, v, do = phase.make_data(1, 2, 64, 16, seed=0, kind="clustered")
    g = phase.make_data(1, 2, 64, 16, seed=0, kind="gaussian")
    assert q.shape == k.shape == v.shape == do.shape == (1, 2, 64, 16) and q.dtype == torch.float64

    def nearest_key_cos(q_, k_):
        qn, kn = torch.nn.functional.normalize(q_, dim=-1), torch.nn.functional.normalize(k_, dim=-1)
        return (qn @ kn.transpose(-1, -2)).amax(-1)

    # 64 / 32 = 2 centres: every query has same-cluster keys (cosine ~ 1 / (1 + 0.3^2)); Gaussian data has none
    assert nearest_key_cos(q, k).min() > 0.8 and nearest_key_cos(q, k).median() > 0.9
    assert nearest_key_cos(g[0], g[1]).median() < 0.7
    assert torch.equal(phase.make_data(1, 2, 64, 16, seed=0, kind="clustered")[0], q)  # seeded
    with pytest.raises(ValueError):
        phase.make_data(1, 2, 64, 16, seed=0, kind="uniform")


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
    # curves are told apart by data and method
    other = [dict(r, data="clustered", method="sparse-lsh", worst_err=2 * r["worst_err"]) for r in rows]
    both = [dict(r, data="clustered", method="plain") for r in rows] + other
    assert phase.error_at(both, 8, 10.0, data="clustered", method="sparse-lsh") == pytest.approx(1.0)
    assert phase.crossing(both, 8, 0.2, data="clustered", method="sparse-lsh") == (pytest.approx(2.0), "at")
    assert phase.crossing(both, 8, 0.2, data="clustered", method="plain")[0] > 2.0
    with pytest.raises(ValueError):
        phase.crossing(both, 8, 0.1, data="gaussian")


def test_phase_writes_md_json_and_png(phase, phase_rows, tmp_path):
    written = phase.write_outputs(phase_rows, tmp_path, seeds=(0,))
    md = written["md"].read_text()
    assert "| logit bound | median group bound | max abs s_ij |" in md
    assert f"torch {torch.__version__}" in md
    for kind, method, m in PHASE_SERIES:
        assert f"## {kind}, {method}, m = {m}" in md
    for kind in ("gaussian", "clustered"):
        assert f"## Worst-gradient error by method ({kind} data)" in md
        assert f"- [{kind}] plain, m = 64: the worst of dq/dk/dv reaches 10% error" in md
    assert "| logit bound | max abs s_ij | plain m=64 | plain m=16 | sparse-lsh m=16 | sparse-local m=16 |" in md
    assert f"package default threshold = {phase.lora.DEFAULT_THRESHOLD:g}" in md
    assert "## Check: is the chain's attention matrix the documented one?" in md
    assert "## Verdict: does the sparse-corrected chain beat the plain chain?" in md
    for kind in ("gaussian", "clustered"):
        for method in ("sparse-lsh", "sparse-local"):
            assert f"- [{kind}] {method} " in md and "20% crossing bound, sparse vs plain: m = 16:" in md
    assert "| support mass |" in md
    data = json.loads(written["json"].read_text())
    assert len(data["rows"]) == len(phase_rows) and data["seeds"] == [0] and data["summary"]
    assert len(data["verdict"]["clustered"]) == 2
    if _has_matplotlib():
        assert written["png"].read_bytes()[:8] == PNG_MAGIC


def test_phase_cli_data_and_methods(phase, capsys):
    rows = phase.main(["--n", "32", "--d", "8", "--heads", "1", "--features", "16", "--num-bounds", "2",
                       "--seeds", "0", "--data", "clustered", "--methods", "plain", "sparse-local", "--width", "8",
                       "--no-write"])
    assert phase._keys(rows) == [("clustered", "plain", 16), ("clustered", "sparse-local", 16)]
    assert all(r["width"] in (None, 8) for r in rows)
    out = capsys.readouterr().out
    assert "worst-gradient error, clustered data" in out and "gaussian data" not in out
    args = phase.parse_args([])
    assert args.data == "both" and args.methods == list(phase.METHODS)
    with pytest.raises(SystemExit):
        phase.parse_args(["--data", "uniform"])


# -------------------------------------------------------------------------------------------- finetune


TINY_FT = dict(
    vocab=16, d_model=32, heads=2, layers=1, seq_len=24, batch=8, eval_batch=16,
    pretrain_period=4, pretrain_shift=0, pretrain_steps=40, period=4, shift=1, steps=12, lr=1e-2,
    rank=4, alpha=8, eval_every=4, num_features=16, threshold=1e-6, redraw_interval=1, seed=0,
    bucket_size=8, n_hashes=2,  # window: default 2 * period + 2 = 10 (|i - j| <= 5 of 23 positions)
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
        assert exact["sparse"] == fallback["sparse"] == approx["sparse"] == 0
        # sparse-corrected: every group is above the threshold and uses the corrected chain, none falls back
        for method in ("chained-sparse-local", "chained-sparse-lsh"):
            r = by[(mode, method)]
            assert (r["approximate"], r["fallback"], r["sparse"]) == (groups, 0, groups), method
            assert r["losses"][1:] != pytest.approx(exact["losses"][1:], rel=1e-6)
            assert -1.0 <= r["grad_cos"] < 1.0 - 1e-6
    assert ft_result["config"]["window"] == 2 * TINY_FT["period"] + 2


def test_finetune_sparse_support_diagnostics(ft_result):
    n = TINY_FT["seq_len"] - 1
    half = ft_result["config"]["window"] // 2
    rows = {(r["method"], r["layer"]): r for r in ft_result["support"]}
    assert set(rows) == {(m, 0) for m in ("chained-sparse-local", "chained-sparse-lsh")}
    local = rows[("chained-sparse-local", 0)]
    in_band = sum(min(i + 1, half + 1) for i in range(n))  # causal pairs with i - j <= half
    assert local["coverage"] == pytest.approx(in_band / (n * (n + 1) / 2))
    for r in rows.values():
        assert 0 < r["coverage"] < 1 and 0 <= r["mass_p10"] <= r["mass_mean"] <= 1 + 1e-6
    # LSH: 2 rounds of 8 of the 23 keys: at most 16 keys per query
    assert rows[("chained-sparse-lsh", 0)]["coverage"] <= 16 * n / (n * (n + 1) / 2)
    for r in rows.values():  # the f~-is-Scatterbrain's check ran (its value is the package's business)
        assert math.isfinite(r["matrix_check"]) and r["matrix_check"] >= 0


def test_finetune_sparse_chain_is_exact_when_the_window_covers_every_pair(finetune):
    cfg = {**finetune.default_config(), **TINY_FT, "window": 2 * TINY_FT["seq_len"]}
    cfg["head_dim"] = cfg["d_model"] // cfg["heads"]
    torch.manual_seed(0)
    base = finetune.TinyLM(cfg["vocab"], cfg["d_model"], cfg["heads"], cfg["layers"], cfg["seq_len"])
    assert finetune.gradient_cosine(base, "full", "chained-sparse-local", cfg) == pytest.approx(1.0, abs=1e-5)
    rows = finetune.support_diagnostics(base, finetune.make_batch(4, cfg["seq_len"], cfg["vocab"], 4, 1,
                                                                  torch.Generator().manual_seed(0))[0], cfg)
    local = [r for r in rows if r["method"] == "chained-sparse-local"]
    assert [r["coverage"] for r in local] == [pytest.approx(1.0)]
    assert local[0]["mass_mean"] == pytest.approx(1.0, abs=1e-5)
    assert finetune.sparse_matrix_check("chained-sparse-local", cfg) < 1e-9  # both exact: the check agrees


def test_finetune_table_and_outputs(finetune, ft_result, tmp_path):
    table = finetune.format_table(ft_result)
    for method in finetune.METHODS:
        assert f"| partial | {method} |" in table and f"| full | {method} |" in table
    assert "fallback %" in table and "ms / step" in table and "sparse groups" in table
    written = finetune.write_outputs(ft_result, tmp_path)
    md = written["md"].read_text()
    assert table in md and "this run is (almost) the exact backward" in md
    for mode in ("partial", "full"):
        for method in ("chained-sparse-local", "chained-sparse-lsh"):
            assert f"Sparse-corrected chain, {mode}, {method}" in md
    assert md.count("does it recover the exact backward's fine-tuning quality?") == 4
    assert md.count("In short, does the sparse-corrected chain recover the exact backward's") == 1
    assert finetune.support_table(ft_result) in md
    saved = json.loads(written["json"].read_text())
    assert [(r["mode"], r["method"], r["sparse"]) for r in saved["runs"]] == [
        (r["mode"], r["method"], r["sparse"]) for r in ft_result["runs"]]
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
    path = tmp_path / f"lora-backward-m16-{datetime.date.today().isoformat()}-cpu.md"
    assert path.read_text().strip() == out.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for --device cuda on a machine without CUDA")
def test_backward_cuda_flag_without_gpu(backward):
    with pytest.raises(SystemExit):
        backward.parse_args(["--device", "cuda"])
