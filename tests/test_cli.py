"""The `scatterattn` command: table, progress, option errors, `python -m scatterattn`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from scatterattn.cli import main

TINY = ["--seq-len", "96", "--heads", "2", "--head-dim", "16", "--features", "32",
        "--bucket-size", "32", "--window", "16", "--repeats", "1"]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{method: cells} from the printed table (the lines between the rule and the device line)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("device:"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def rel_errors(rows):
    # method, settings (one or more words), rel. error, time, speedup, peak mem: error is 4th from the end
    return {name: float(cells[-4]) for name, cells in rows.items()}


def run_main(capsys, *extra):
    assert main([*TINY, *extra]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.parametrize(
    "extra, methods",
    [
        ((), {"dense", "scatterbrain", "performer", "lsh"}),
        (("--sparse", "local", "--causal"), {"dense", "scatterbrain", "performer", "local"}),
        (("--sparse", "none"), {"dense", "performer"}),
        (("--features", "0", "--n-hashes", "2"), {"dense", "lsh"}),
    ],
)
def test_table_rows_and_errors(capsys, extra, methods):
    out, err = run_main(capsys, *extra)
    rows = table_rows(out)
    assert set(rows) == methods
    assert next(iter(rows)) == "dense"  # the reference row comes first
    errors = rel_errors(rows)
    assert errors["dense"] == 0.0
    for name, value in errors.items():
        assert math.isfinite(value), (name, value)
        assert value >= 0
    for name, cells in rows.items():
        time_ms, speedup, mem = float(cells[-3]), cells[-2], float(cells[-1])
        assert math.isfinite(time_ms) and time_ms >= 0
        assert speedup.endswith("x")
        assert math.isfinite(mem) and mem >= 0
    assert "device: cpu" in out or "device: cuda" in out
    assert f"torch {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "auto -> reference (pure PyTorch)" in out  # the CPU path is the reference
    # progress: one numbered line per step on stderr, nothing of it on stdout
    total = len(methods) + 1
    for step in range(1, total + 1):
        assert f"[{step}/{total}]" in err
    assert "[1/" not in out


def test_approximations_are_not_exact_and_seed_is_deterministic(capsys):
    first = rel_errors(table_rows(run_main(capsys)[0]))
    second = rel_errors(table_rows(run_main(capsys)[0]))
    assert first == second
    for name in ("scatterbrain", "performer", "lsh"):
        assert 0 < first[name] < 10


def test_low_precision_dense_is_compared_with_float32(capsys):
    out, _ = run_main(capsys, "--dtype", "bfloat16", "--sparse", "none")
    errors = rel_errors(table_rows(out))
    assert 0 < errors["dense"] < 0.05  # bfloat16 rounding, measured against float32 attention
    assert "bfloat16" in out


def test_help_exits_zero_and_documents_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--seq-len", "--heads", "--head-dim", "--batch", "--features", "--bucket-size",
                   "--n-hashes", "--sparse", "--window", "--dtype", "--device", "--repeats",
                   "--seed", "--causal"):
        assert option in out
    assert "topics" in out  # what the demo input is
    assert "RSS" in out  # what the CPU memory column measures


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--seq-len", "0"], "--seq-len"),
        (["--sparse", "foo"], "--sparse"),
        (["--heads", "-2"], "--heads"),
        (["--head-dim", "x"], "--head-dim"),
        (["--repeats", "0"], "--repeats"),
        (["--window", "-1"], "--window"),
        (["--dtype", "float64"], "--dtype"),
        (["--features", "0", "--sparse", "none"], "--features"),
        (["--seed", str(2**63)], "--seed"),
    ],
)
def test_bad_option_exits_nonzero_naming_it(capsys, argv, named):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    captured = capsys.readouterr()
    assert named in captured.err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_an_option_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda"])
    assert exc.value.code != 0
    assert "--device cuda" in capsys.readouterr().err


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "scatterattn", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: scatterattn" in proc.stdout
    assert "--seq-len" in proc.stdout


def test_python_dash_m_bad_option():
    proc = subprocess.run(
        [sys.executable, "-m", "scatterattn", "--sparse", "foo"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "--sparse" in proc.stderr


def test_cpu_out_of_memory_is_reported_not_a_traceback(capsys, monkeypatch):
    """torch's CPU allocator fails with a RuntimeError, not MemoryError: the CLI reports it as out
    of memory with a hint; any other RuntimeError still propagates."""
    from scatterattn import cli

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1000000000000 bytes.")

    monkeypatch.setattr(cli, "_run", fail)
    assert main(["--seq-len", "64"]) == 1
    assert "out of memory on cpu" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        main(["--seq-len", "64"])
