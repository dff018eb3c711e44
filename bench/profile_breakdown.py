"""Where the time of one call goes: torch.profiler's per-op self time, as a markdown table.

Used by bench/kernels.py and bench/lora_backward.py (--profile) to say what bounds a method at a
given size (its Triton kernels, sorting, torch glue, the number of launches) from a measurement.
On CUDA it ranks the device-side events (kernels, memcpy, memset) by self device time; the CPU ops
that launched them also carry that time in torch's averages and are left out, so nothing counts
twice. On the CPU it ranks ops by self CPU time (for tests).
"""

from __future__ import annotations

import torch


def breakdown(fn, *, repeats: int = 3, top: int = 12) -> dict:
    """Profile `fn()` `repeats` times (after one warm-up call). Returns {'device', 'total_ms' (per
    call), 'launches' (ops with device time per call; CPU: op calls), 'rows': [(name, calls per
    call, ms per call, share)], 'table' (markdown)}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = timed_events(prof.key_averages(), cuda)
    total_us = sum(getattr(e, key) for e in events) / repeats
    if total_us <= 0:
        raise RuntimeError(f"nothing recorded {key} (did fn run on the profiled device?)")
    rows = [(e.key, e.count / repeats, getattr(e, key) / repeats / 1000, getattr(e, key) / repeats / total_us)
            for e in events[:top]]
    launches = sum(e.count for e in events) / repeats
    lines = [f"{'device' if cuda else 'CPU'} time per call {total_us / 1000:.3f} ms in {launches:.0f} "
             f"{'kernel launches' if cuda else 'op calls'}; top {len(rows)} by self time:", "",
             "| op / kernel | calls | ms | share |", "|---|---|---|---|"]
    for name, calls, ms, share in rows:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {calls:g} | {ms:.3f} | {100 * share:.1f}% |")
    return dict(device="cuda" if cuda else "cpu", total_ms=total_us / 1000, launches=launches, rows=rows,
                table="\n".join(lines))


def timed_events(averages, cuda: bool) -> list:
    """The events to rank, largest self time first: on CUDA the device-side ones only (a CPU op's
    self device time is its kernels' time, listed again as the kernels themselves), on the CPU the
    CPU ops; user annotations (record_function ranges) are left out on both."""
    from torch.autograd import DeviceType

    kind, key = (DeviceType.CUDA, "self_device_time_total") if cuda else (DeviceType.CPU, "self_cpu_time_total")
    events = [e for e in averages if e.device_type == kind and not getattr(e, "is_user_annotation", False)
              and getattr(e, key) > 0]
    return sorted(events, key=lambda e: getattr(e, key), reverse=True)
