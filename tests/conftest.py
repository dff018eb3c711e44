"""Test setup, before any test module loads:
* without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1 must be set before triton
  is first imported), and its bf16 `tl.dot`, which multiplies the bit patterns of bf16 operands
  (triton-lang/triton#11584), gets them widened to fp32 first: exact, as a GPU's tensor cores form
  bf16 products exactly and accumulate them in fp32, so bf16 kernels are tested on the CPU too
  (`scatterattn.kernels.interpreter.bf16_dot_works` tells the package whether a dot is right), and
  its fp32 -> bf16 casts, which truncate, round to nearest even as a GPU's do;
* a torchvision whose compiled operators cannot load beside this torch (the CUDA torchvision 0.28
  next to the CPU torch 2.13 the test extra installs) is made importable, for timm and transformers.
"""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def widen_bf16_dot_operands():
    """Make the interpreter's tl.dot widen bf16 operands (stored as uint16) to fp32; a no-op for
    other dtypes. Returns the original method (for tests that need it back)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, *rest):
        return original(self, widen(a), widen(b), *rest)

    builder.create_dot = create_dot
    return original


def round_bf16_casts_to_nearest():
    """Make the interpreter's fp32 -> bf16 casts (`x.to(tl.bfloat16)`, bf16 stores) round to
    nearest even, as a GPU's cvt.rn.bf16.f32 does; the interpreter truncates them (a bias of
    -2.7e-3 relative on average), which the kernels' long bf16 sums turn into errors a GPU does not
    make. Returns the original method."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl
    return original


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    INTERPRETER_CREATE_DOT = widen_bf16_dot_operands()
    INTERPRETER_CAST = round_bf16_casts_to_nearest()

from scatterattn.integrations import ensure_torchvision_importable  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # its warning says what test_integrations_timm says
    ensure_torchvision_importable()
