"""Host-side helpers for the kernel launchers.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions (usable inside kernels); called
from Python they cost about 1.5 us each, and an eager Scatterbrain forward and backward make some
twenty such calls. These plain versions give the same results (tests/test_kernels.py checks).

`launch_device`: Triton launches a kernel on the *current* CUDA device, whatever device its tensors
are on (torch ops follow their tensors). Every launcher runs under it, so that inputs on another
GPU than the current one (a model spread over GPUs with `device_map="auto"`, a process that moved
its model to `cuda:1` without `torch.cuda.set_device`) run there instead of faulting on the wrong GPU.
"""

import contextlib
import warnings

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def launch_device(tensor: torch.Tensor):
    """A context making `tensor`'s CUDA device the current one for Triton launches; a no-op where it
    already is, for CPU tensors (the interpreter) and while torch.compile traces (its generated code
    guards the device itself)."""
    device = tensor.device
    if device.type != "cuda" or torch.compiler.is_compiling() or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def alert_not_deterministic(what: str, remedy: str) -> None:
    """As torch's own nondeterministic ops do under `torch.use_deterministic_algorithms(True)`:
    raise (or, with warn_only=True, warn) that `what` has no deterministic implementation."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{what} does not have a deterministic implementation (fp32 atomic adds, whose order varies "
               f"from run to run), but torch.use_deterministic_algorithms(True) is set. {remedy}")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)
