"""The examples in `examples/` run end to end (tiny settings), so that they cannot rot unnoticed.

They are user-facing documentation of the integrations; these runs check that each completes,
that its dense baseline is what it claims (zero error against itself) and that every figure it
reports is finite.
"""

import importlib.util
import math
import pathlib
import re

import pytest

from scatterattn.integrations import ensure_torchvision_importable

ensure_torchvision_importable()  # no-op unless a torchvision with broken compiled ops is installed
pytest.importorskip("transformers", reason="the examples use transformers (test extra: pip install -e '.[test]')")
pytest.importorskip("matplotlib", reason="train_small_models.py plots (test extra: pip install -e '.[test]')")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_hf_encoder_budget_runs(tmp_path):
    example = load("hf_encoder_budget")
    out = tmp_path / "budget.md"
    text = example.main(["--seq-len", "48", "--batch", "2", "--hidden", "32", "--heads", "2", "--layers", "2",
                         "--budgets", "8", "16", "--sharpness", "1", "16", "--threads", "1", "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    rows = table_rows(text)
    assert len(rows) == 2 * (1 + 3 * 2 + 1)  # per sharpness: dense, 3 methods x 2 budgets, layer 0 exact
    for row in rows:
        errors = [float(cell) for cell in row[2:4]]
        assert all(math.isfinite(e) and e >= 0 for e in errors), row
        if row[0] == "dense (sdpa)":
            assert errors == [0.0, 0.0]
        elif row[0] == "scatterbrain, layer 0 exact":
            assert errors[0] == 0.0  # the first layer is exact: its output matches dense exactly
        else:
            assert errors[0] > 0  # a real approximation at these budgets


def test_train_small_models_runs(tmp_path):
    example = load("train_small_models")
    results = example.main(["--vit-steps", "4", "--lm-steps", "4", "--eval-every", "2", "--eval-size", "8",
                            "--batch", "4", "--copy-len", "7", "--out", str(tmp_path / "train")])
    assert set(results) == {(task, method) for task in ("vit", "lm") for method in example.METHODS}
    for (task, method), (curve, step_time) in results.items():
        assert [step for step, _, _ in curve][-1] == 4, (task, method)
        assert all(math.isfinite(loss) and 0 <= acc <= 1 for _, loss, acc in curve), (task, method)
        assert step_time > 0
    text = (tmp_path / "train.md").read_text()
    assert len(re.findall(r"^\| (vit|lm) \|", text, flags=re.M)) == 2 * len(example.METHODS)
    assert (tmp_path / "train.png").stat().st_size > 0
