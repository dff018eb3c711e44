"""Autograd binding of the Triton kernels (scatterattn.kernels) and the check that they apply.

The kernels compute the same function as scatterattn.reference.scatterbrain_reference, with one
difference: the feature matrix is rounded once to the input dtype (fp16/bf16) so that it can feed
tensor-core dots; W rounded is a feature matrix of the same distribution up to that rounding, used
consistently on both sides, so the estimator keeps its form. fp32 inputs keep W in fp32.
"""

from __future__ import annotations

import math
import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # D = 256 compiles, but the backward's tiles need 288 KiB of shared memory (sm_90: 227)
CHAINED_MAX_HEAD_DIM = 256  # the chained-gradient kernels (scatterattn.kernels.chained_grad.MAX_DIM)
MAX_BATCH_HEADS = 65535  # the kernels launch batch * heads programs along a CUDA grid axis capped there


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(query: torch.Tensor, is_causal: bool, value: torch.Tensor | None = None,
                       max_head_dim: int = MAX_HEAD_DIM) -> str | None:
    """Why the kernels cannot run these inputs, or None when they can."""
    if is_causal:
        return "causal Scatterbrain kernels are not implemented yet (is_causal=True runs on the reference)"
    if query.dtype not in KERNEL_DTYPES:
        return f"the kernels take float16, bfloat16 or float32 inputs, got {query.dtype}"
    if query.shape[0] * query.shape[1] > MAX_BATCH_HEADS:
        return (f"the kernels take batch * heads up to {MAX_BATCH_HEADS} (one CUDA grid axis), got "
                f"{query.shape[0]} * {query.shape[1]}")
    dims = (query.shape[-1],) if value is None else (query.shape[-1], value.shape[-1])
    if max(dims) > max_head_dim:
        return f"the kernels take head dims up to {max_head_dim} (query and value), got {dims}"
    if query.device.type != "cuda" and not (query.device.type == "cpu" and interpreter_enabled()):
        return (
            f"the kernels need CUDA tensors (got device {query.device}); on the CPU set "
            "TRITON_INTERPRET=1 before importing triton to run them in the interpreter"
        )
    if not triton_available():
        return "triton is not installed"
    return None


class ScatterbrainTritonFunction(torch.autograd.Function):
    """out = Scatterbrain(q, k, v) with the fused forward and backward kernels (non-causal)."""

    @staticmethod
    def forward(ctx, query, key, value, feature_matrix, plan, scale, key_valid):
        from .kernels import scatterbrain_fwd as fwd

        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        w = None if feature_matrix is None else feature_matrix.to(device=q.device, dtype=q.dtype).contiguous()
        state = None if w is None else fwd.key_state(k, v, w, key_valid, math.sqrt(scale))
        out, den, stab = fwd.sparse_lowrank_forward(
            q, k, v, w, state, plan, tau=scale, key_valid=key_valid, out_dtype=q.dtype
        )
        state_tensors = () if state is None else state
        ctx.save_for_backward(q, k, v, out, den, stab, *(() if w is None else (w,)), *state_tensors)
        ctx.has_features = w is not None
        ctx.plan, ctx.scale, ctx.key_valid = plan, scale, key_valid
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .kernels import scatterbrain_bwd as bwd

        q, k, v, out, den, stab, *rest = ctx.saved_tensors
        w, state = (rest[0], tuple(rest[1:])) if ctx.has_features else (None, None)
        dq, dk, dv = bwd.sparse_lowrank_backward(
            q, k, v, out, grad_out, w, state, ctx.plan, den, stab,  # the launcher takes dO's strides
            tau=ctx.scale, key_valid=ctx.key_valid,
        )
        return dq, dk, dv, None, None, None, None


def scatterbrain_triton(query, key, value, *, scale, feature_matrix, plan, key_valid) -> torch.Tensor:
    return ScatterbrainTritonFunction.apply(query, key, value, feature_matrix, plan, scale, key_valid)
