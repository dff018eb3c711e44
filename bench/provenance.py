"""Where a benchmark's figures come from: the repository commit they were measured at."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short commit of the repository, '+dirty' when the package (scatterattn/, kernels/) has local
    changes; outside a git checkout (a copy of the tree on a GPU machine) the GPU_CHECK_COMMIT
    environment variable, else 'unknown'."""
    given = os.environ.get("GPU_CHECK_COMMIT")
    if given and not (ROOT / ".git").exists():
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "scatterattn", "kernels"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return given or "unknown"
    if not head:
        return given or "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_report(title: str, setting: str, body: list[str], out: str | None) -> str:
    """Markdown report of a CPU measurement: '# title (date, commit)', a line naming this CPU, the
    torch and triton versions and `setting`, then body; printed, written to `out` when given."""
    import os
    import platform
    from datetime import date

    import torch
    import triton

    report = "\n".join([
        f"# {title} ({date.today().isoformat()}, commit {git_commit()})",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"triton {triton.__version__}; {setting}",
        "",
        *body,
        "",
    ])
    print(report)
    if out:
        Path(out).write_text(report)
    return report
