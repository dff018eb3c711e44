"""Autograd binding of the Triton kernels (scatterattn.kernels) and the check that they apply.

The kernels compute the same function as scatterattn.reference.scatterbrain_reference, with one
difference: the feature matrix is rounded once to the input dtype (fp16/bf16) so that it can feed
tensor-core dots; W rounded is a feature matrix of the same distribution up to that rounding, used
consistently on both sides, so the estimator keeps its form. fp32 inputs keep W in fp32.

The kernel launchers are registered as two custom operators, `torch.ops.scatterattn.scatterbrain_forward`
and `scatterbrain_backward`, each with a shape-only (fake) implementation: `torch.compile` treats
them as opaque calls and traces everything around them (validation, hashing, the sparse plan, the
autograd Function), so a compiled model, and CUDA graphs, can hold the whole attention call. Eager
calls on plain tensors run the same launchers directly (`_direct_call`): the operator dispatch
costs some 10 us of host time per call and does nothing there.
"""

import math
import os
from typing import Optional

import torch

from .kernels.host import launch_device

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


def _triton_built_for_interpreter() -> bool:
    """Whether triton was imported with TRITON_INTERPRET set: its standard-library functions are then
    interpreted, which kernels running in the interpreter need."""
    import triton.language.standard as standard

    return type(standard.sigmoid).__name__ == "InterpretedFunction"


def unsupported_reason(query: torch.Tensor, is_causal: bool, value: torch.Tensor | None = None,
                       max_head_dim: int = MAX_HEAD_DIM, bf16_dots: bool = True) -> str | None:
    """Why the kernels cannot run these inputs, or None when they can. bf16_dots: whether bf16
    inputs reach `tl.dot` as bf16 (the Scatterbrain kernels; the chained-gradient kernels take fp32
    operands in the interpreter)."""
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
    if query.device.type == "cpu" and not _triton_built_for_interpreter():
        return ("TRITON_INTERPRET=1 was set after triton was imported (importing torch's compiler or scatterattn "
                "imports it), so triton's own functions were built for a GPU: set it before those imports")
    if bf16_dots and query.dtype == torch.bfloat16 and query.device.type == "cpu":
        from .kernels.interpreter import bf16_casts_round, bf16_dot_works

        if not bf16_dot_works():
            return ("the Triton interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584): run bf16 "
                    "inputs on a GPU, or float16/float32 ones in the interpreter")
        if not bf16_casts_round():
            return ("the Triton interpreter's fp32 -> bf16 casts truncate where a GPU rounds to nearest "
                    "(triton-lang/triton#8322), which the kernels' sums amplify: run bf16 inputs on a GPU, "
                    "or float16/float32 ones in the interpreter")
    return None


def _plan_of(q_index, k_index, q_bucket, k_bucket, band, n_q, n_k):
    from .sparsity import SparsePlan

    if q_index is None:
        return None
    return SparsePlan(q_index=q_index, k_index=k_index, num_queries=n_q, num_keys=n_k, band=band,
                      q_bucket=q_bucket, k_bucket=k_bucket)


def scatterbrain_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Optional[torch.Tensor],
    q_index: Optional[torch.Tensor], k_index: Optional[torch.Tensor], q_bucket: Optional[torch.Tensor],
    k_bucket: Optional[torch.Tensor], key_valid: Optional[torch.Tensor], scale: float, band: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, den, stab, KV, z, g) of the forward kernels; q, k, v contiguous, w (m, D) in q's dtype
    or None (no low-rank term: KV, z, g empty); the plan's tensors (None: no sparse support)."""
    from .kernels import scatterbrain_fwd as fwd

    plan = _plan_of(q_index, k_index, q_bucket, k_bucket, band, q.shape[2], k.shape[2])
    with launch_device(q):
        state = None if w is None else fwd.key_state(
            k, v, w, key_valid, math.sqrt(scale), split=fwd.per_pair_plan(plan, True, q.shape[-1], v.shape[-1]))
        out, den, stab = fwd.sparse_lowrank_forward(q, k, v, w, state, plan, tau=scale, key_valid=key_valid,
                                                    out_dtype=q.dtype)
    if state is None:
        state = tuple(q.new_empty(0, dtype=torch.float32) for _ in range(3))
    return out, den, stab, *state


scatterbrain_forward_op = torch.library.custom_op("scatterattn::scatterbrain_forward", mutates_args=())(
    scatterbrain_forward)


@scatterbrain_forward_op.register_fake
def _(q, k, v, w, q_index, k_index, q_bucket, k_bucket, key_valid, scale, band):
    batch, heads, n_q, _ = q.shape
    v_dim = v.shape[-1]
    stats = [q.new_empty(batch, heads, n_q, dtype=torch.float32) for _ in range(2)]
    if w is None:
        state = [q.new_empty(0, dtype=torch.float32) for _ in range(3)]
    else:
        states, m = batch * k.shape[1], w.shape[0]
        state = [q.new_empty(states, m, v_dim, dtype=torch.float32),
                 *(q.new_empty(states, m, dtype=torch.float32) for _ in range(2))]
    return q.new_empty(batch, heads, n_q, v_dim), *stats, *state


def scatterbrain_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
    w: Optional[torch.Tensor], kv: torch.Tensor, z: torch.Tensor, g: torch.Tensor, den: torch.Tensor,
    stab: torch.Tensor, q_index: Optional[torch.Tensor], k_index: Optional[torch.Tensor],
    q_bucket: Optional[torch.Tensor], k_bucket: Optional[torch.Tensor], key_valid: Optional[torch.Tensor],
    scale: float, band: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the backward kernels for the forward that gave out, den, stab, KV, z, g."""
    from .kernels import scatterbrain_bwd as bwd

    plan = _plan_of(q_index, k_index, q_bucket, k_bucket, band, q.shape[2], k.shape[2])
    state = None if w is None else (kv, z, g)
    with launch_device(q):
        return bwd.sparse_lowrank_backward(q, k, v, out, grad_out, w, state, plan, den, stab,  # takes dO's strides
                                           tau=scale, key_valid=key_valid)


scatterbrain_backward_op = torch.library.custom_op("scatterattn::scatterbrain_backward", mutates_args=())(
    scatterbrain_backward)


@scatterbrain_backward_op.register_fake
def _(q, k, v, out, grad_out, w, kv, z, g, den, stab, q_index, k_index, q_bucket, k_bucket, key_valid, scale,
      band):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _no_second_derivative(ctx, *grads):
    raise RuntimeError("the Triton kernels' backward of Scatterbrain attention has no derivative of its own: "
                       "second derivatives (a gradient penalty, a Hessian-vector product) need backend='reference'")


scatterbrain_backward_op.register_autograd(_no_second_derivative, setup_context=lambda ctx, inputs, output: None)


def _direct_call(q: torch.Tensor) -> bool:
    """Whether to run the launchers without the custom operators: in eager mode on plain tensors.
    Under torch.compile or export, under any dispatch mode (FakeTensorMode, make_fx, a user's
    TorchDispatchMode) and for tensor subclasses, the operators are what such callers see; so is a
    backward with create_graph=True (the backward operator refuses a second derivative)."""
    return (type(q) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def _plan_tensors(plan):
    """The plan's index tensors as they are (the kernels read int64 lists through their strides)."""
    if plan is None:
        return (None, None, None, None), None
    return (plan.q_index, plan.k_index, plan.q_bucket, plan.k_bucket), plan.band


def plan_covers_every_pair(plan) -> bool:
    """Whether a plan's support is every (query, key) pair: one tile per round with no band (LSH
    with a single bucket, N and S up to the bucket size), whose round 0 lists every query and key,
    or a band |i - j| <= h with h >= max(N, S) - 1 (a local window wider than both sequences,
    whose key lists then hold every key). Scatterbrain is then exact attention: its low-rank term
    phi . KV minus the same over the support is zero."""
    if plan is None:
        return False
    if plan.band is None:
        return plan.q_index.shape[-2] == 1
    return plan.band >= max(plan.num_queries, plan.num_keys) - 1


class ScatterbrainTritonFunction(torch.autograd.Function):
    """out = Scatterbrain(q, k, v) with the fused forward and backward kernels (non-causal), run by
    the custom operators above. Where the support is every pair (`plan_covers_every_pair`) they
    run without the low-rank term, which is zero there: the same function, without feature work
    and without the rounding of two nearly equal low-rank sums."""

    @staticmethod
    def forward(ctx, query, key, value, feature_matrix, plan, scale, key_valid):
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        if plan_covers_every_pair(plan):
            feature_matrix = None
        w = None if feature_matrix is None else feature_matrix.to(device=q.device, dtype=q.dtype).contiguous()
        plan_tensors, band = _plan_tensors(plan)
        forward = scatterbrain_forward if _direct_call(q) else scatterbrain_forward_op
        out, den, stab, kv, z, g = forward(q, k, v, w, *plan_tensors, key_valid, scale, band)
        ctx.save_for_backward(q, k, v, out, den, stab, w, kv, z, g, *plan_tensors, key_valid)
        ctx.scale, ctx.band = scale, band
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, den, stab, w, kv, z, g, *plan_tensors, key_valid = ctx.saved_tensors
        # (create_graph=True: through the operator, which refuses a second derivative it has no formula for)
        direct = _direct_call(grad_out) and not torch.is_grad_enabled()
        backward = scatterbrain_backward if direct else scatterbrain_backward_op
        dq, dk, dv = backward(q, k, v, out, grad_out, w, kv, z, g, den, stab, *plan_tensors, key_valid, ctx.scale,
                              ctx.band)
        return dq, dk, dv, None, None, None, None


def scatterbrain_triton(query, key, value, *, scale, feature_matrix, plan, key_valid) -> torch.Tensor:
    return ScatterbrainTritonFunction.apply(query, key, value, feature_matrix, plan, scale, key_valid)
