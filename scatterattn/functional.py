"""SDPA-style functional API.

    out = scatterbrain_attention(q, k, v, num_features=256, sparse="lsh", bucket_size=128)

q (B, H, N, D); k (B, Hkv, S, D); v (B, Hkv, S, Dv); H a multiple of Hkv (grouped-query heads, no
copies of k and v). Returns (B, H, N, Dv) in q's dtype. `key_padding_mask` (B, S) bool follows
torch.nn.MultiheadAttention: True marks a padded key, which takes no part in either term.
`is_causal` is top-left aligned, as in torch.nn.functional.scaled_dot_product_attention.
Arbitrary (N, S) attention masks are not accepted: the low-rank term cannot express them without
N x S work.

Randomness: the feature matrix and the hash projections are drawn from `generator`, else from a
generator seeded with `seed`, else from torch's global RNG; or passed in directly
(`feature_matrix`, `hash_projections`), which is what `ScatterbrainAttention` does with its buffers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass

import torch

from . import reference, triton_backend
from .config import ScatterbrainConfig
from .features import draw_feature_matrix, draw_hash_projections, effective_feature_matrix, make_generator
from .sparsity import SparsePlan, local_plan, lsh_plan

BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)  # float64 stays, as under autocast
# device types with an autocast mode (not meta); a fixed set: torch.amp.is_autocast_available is not
# traceable by torch.compile in torch 2.11
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "xla"})


def follows_autocast(method: bool = False):
    """Decorator for attention entry points taking (query, key, value, ...) (after self when
    `method`): under torch.autocast they attend in the autocast dtype of the inputs' device type,
    as torch's scaled_dot_product_attention does (float16/bfloat16/float32 inputs cast to it,
    float64 kept), and run with autocast off, so that what they compute in float32 internally
    (feature logits, hashes, normalisers) stays float32. Outside autocast: the call as it is."""

    names = ("query", "key", "value")

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = 1 if method else 0
            positional = args[first:first + 3]  # q, k, v given by position, then by name
            query = positional[0] if positional else kwargs.get("query")
            device_type = query.device.type if isinstance(query, torch.Tensor) else None
            if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type)

            def cast(t):
                return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTS else t

            args = (*args[:first], *map(cast, positional), *args[first + 3:])
            kwargs = {name: cast(t) if name in names[len(positional):] else t for name, t in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def validate_qkv(query, key, value, key_padding_mask=None, scale=None) -> None:
    """Raise a clear error naming the argument when the inputs cannot be attended."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    batch, heads, n_q, dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads but value has {value.shape[1]}")
    if key.shape[1] < 1 or heads % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({heads}) must be a multiple of key/value heads ({key.shape[1]})"
        )
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key has seq_len {key.shape[2]} but value has {value.shape[2]}")
    if key.shape[3] != dim:
        raise ValueError(f"head-dim mismatch: query head_dim {dim}, key head_dim {key.shape[3]}")
    if dim < 1 or value.shape[3] < 1:
        raise ValueError(f"head_dim must be >= 1, got query {dim}, value {value.shape[3]}")
    if n_q < 1:
        raise ValueError(f"query seq_len must be >= 1, got {n_q}")
    if key.shape[2] < 1:
        raise ValueError(f"key seq_len must be >= 1, got {key.shape[2]}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be a bool tensor (True = padded key), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (batch, key.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, key_seq_len) = {(batch, key.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or scale < 0):
        raise ValueError(f"scale must be a finite number >= 0 or None (as SDPA's), got {scale!r}")


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def draw_random_parameters(
    config: ScatterbrainConfig,
    head_dim: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(feature_matrix (m, D) or None, hash_projections (R, D + 2) or None), float32, CPU.

    Draw order is fixed (features first), so one seed gives the same pair everywhere, inside
    torch.func transforms too (drawn once, outside them: vmap would refuse the draws or make one
    per sample).
    """
    with _outside_func_transforms():
        features = None
        if config.has_low_rank:
            features = draw_feature_matrix(config.num_features, head_dim, generator=generator)
        projections = None
        if config.sparse == "lsh":
            projections = draw_hash_projections(config.n_hashes, head_dim, generator=generator)
    return features, projections


def _outside_func_transforms():
    """A context that suspends active torch.func transforms (vmap, grad, ...); a no-op outside them
    and while torch.compile traces."""
    functorch = getattr(torch._C, "_functorch", None)
    if (torch.compiler.is_compiling() or functorch is None or not hasattr(torch._C, "_DisableFuncTorch")
            or functorch.peek_interpreter_stack() is None):
        return contextlib.nullcontext()
    return torch._C._DisableFuncTorch()


@dataclass(frozen=True)
class PreparedAttention:
    """Everything a backend needs: resolved scale, effective feature rows, sparse plan, mask."""

    config: ScatterbrainConfig
    scale: float
    feature_matrix: torch.Tensor | None  # (m_eff, D) float32 on the input device
    plan: SparsePlan | None
    key_valid: torch.Tensor | None  # (B, S) bool, True = real key
    is_causal: bool


def prepare(
    query,
    key,
    value,
    config: ScatterbrainConfig,
    *,
    scale=None,
    is_causal=False,
    key_padding_mask=None,
    feature_matrix=None,
    hash_projections=None,
    generator=None,
    inputs_validated: bool = False,
) -> PreparedAttention:
    """Validate inputs (unless the caller already ran `validate_qkv` on them: inputs_validated),
    draw or check the random parameters and build the sparse plan."""
    if not inputs_validated:
        validate_qkv(query, key, value, key_padding_mask, scale)
    dim = query.shape[-1]
    need_draw = (config.has_low_rank and feature_matrix is None) or (
        config.sparse == "lsh" and hash_projections is None
    )
    if need_draw:
        drawn_features, drawn_projections = draw_random_parameters(config, dim, generator=generator)
        feature_matrix = drawn_features if feature_matrix is None else feature_matrix
        hash_projections = drawn_projections if hash_projections is None else hash_projections
    if config.has_low_rank:
        _check_param("feature_matrix", feature_matrix, (config.num_features, dim))
        feature_matrix = effective_feature_matrix(
            feature_matrix.to(device=query.device, dtype=torch.float32), config.feature_type
        )
    else:
        feature_matrix = None
    # contiguous once here: the kernels' launchers read it with unit stride along S
    key_valid = None if key_padding_mask is None else (~key_padding_mask).contiguous()
    plan = None
    if config.sparse == "lsh":
        _check_param("hash_projections", hash_projections, (config.n_hashes, dim + 2))
    if config.sparse == "lsh" and not attends_nothing(query):
        plan = lsh_plan(
            query, key, bucket_size=config.bucket_size, hash_projections=hash_projections, key_valid=key_valid
        )
    elif config.sparse == "local":
        plan = local_plan(query.shape[2], key.shape[2], window=config.window, device=query.device)
    return PreparedAttention(
        config=config,
        scale=default_scale(scale, dim),
        feature_matrix=feature_matrix,
        plan=plan,
        key_valid=key_valid,
        is_causal=bool(is_causal),
    )


def _check_param(name: str, tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")


def resolve_backend(backend: str, query: torch.Tensor, is_causal: bool, value: torch.Tensor | None = None,
                    feature_matrix: torch.Tensor | None = None) -> str:
    """'reference' or 'triton'. 'auto' takes the kernels for CUDA inputs they support (non-causal,
    fp16/bf16/fp32, head dims up to 128, a feature matrix that needs no gradient) and the
    reference otherwise; 'triton' raises when the kernels cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = triton_backend.unsupported_reason(query, is_causal, value)
    if reason is None and feature_matrix is not None and feature_matrix.requires_grad and torch.is_grad_enabled():
        reason = ("feature_matrix requires grad and the kernels have no gradient for it (only the reference "
                  "differentiates through the random features): detach it, or use backend='reference'")
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
        return "triton"
    return "triton" if query.device.type == "cuda" and reason is None else "reference"


def attends_nothing(query: torch.Tensor) -> bool:
    """Whether a call has no query rows (batch 0, or no query heads): its output is empty."""
    return query.shape[0] == 0 or query.shape[1] == 0


def run_prepared(query, key, value, prepared: PreparedAttention, backend: str = "auto") -> torch.Tensor:
    chosen = resolve_backend(backend, query, prepared.is_causal, value, prepared.feature_matrix)
    if attends_nothing(query):  # the empty output, in the inputs' graph as SDPA's is (the exact formula: no work)
        return reference.dense_attention(query, key, value, scale=prepared.scale, is_causal=prepared.is_causal,
                                         key_valid=prepared.key_valid)
    if chosen == "triton":
        return triton_backend.scatterbrain_triton(
            query,
            key,
            value,
            scale=prepared.scale,
            feature_matrix=prepared.feature_matrix,
            plan=prepared.plan,
            key_valid=prepared.key_valid,
        )
    return reference.scatterbrain_reference(
        query,
        key,
        value,
        scale=prepared.scale,
        feature_matrix=prepared.feature_matrix,
        plan=prepared.plan,
        is_causal=prepared.is_causal,
        key_valid=prepared.key_valid,
    )


def prepare_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    num_features: int = 256,
    feature_type: str = "positive",
    sparse: str = "lsh",
    bucket_size: int = 128,
    n_hashes: int = 1,
    window: int = 128,
    feature_matrix: torch.Tensor | None = None,
    hash_projections: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> PreparedAttention:
    """The keyword form of `prepare`, shared by scatterbrain_attention and the diagnostics."""
    config = ScatterbrainConfig(
        num_features=num_features,
        feature_type=feature_type,
        sparse=sparse,
        bucket_size=bucket_size,
        n_hashes=n_hashes,
        window=window,
    )
    return prepare(
        query,
        key,
        value,
        config,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        feature_matrix=feature_matrix,
        hash_projections=hash_projections,
        generator=make_generator(seed) if generator is None else generator,
    )


@follows_autocast()
def scatterbrain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    num_features: int = 256,
    feature_type: str = "positive",
    sparse: str = "lsh",
    bucket_size: int = 128,
    n_hashes: int = 1,
    window: int = 128,
    feature_matrix: torch.Tensor | None = None,
    hash_projections: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scatterbrain attention: exact exp(q.k) on the sparse support, phi(q).phi(k) elsewhere,
    row-normalised (an unbiased estimate of softmax attention's unnormalised weights).

    See the module docstring for shapes, masks and randomness, and `ScatterbrainConfig` for the
    approximation settings (num_features, feature_type, sparse, bucket_size, n_hashes, window).
    """
    prepared = prepare_call(
        query,
        key,
        value,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        num_features=num_features,
        feature_type=feature_type,
        sparse=sparse,
        bucket_size=bucket_size,
        n_hashes=n_hashes,
        window=window,
        feature_matrix=feature_matrix,
        hash_projections=hash_projections,
        seed=seed,
        generator=generator,
    )
    return run_prepared(query, key, value, prepared, backend)


def performer_attention(query, key, value, *, num_features: int = 256, feature_type: str = "positive", **kwargs):
    """Performer (FAVOR+ low-rank only): scatterbrain_attention with sparse='none'."""
    return scatterbrain_attention(
        query, key, value, num_features=num_features, feature_type=feature_type, sparse="none", **kwargs
    )


def lsh_attention(query, key, value, *, bucket_size: int = 128, n_hashes: int = 1, **kwargs):
    """Sparse softmax over LSH buckets only: scatterbrain_attention with num_features=0."""
    return scatterbrain_attention(
        query, key, value, num_features=0, sparse="lsh", bucket_size=bucket_size, n_hashes=n_hashes, **kwargs
    )


def local_attention(query, key, value, *, window: int = 128, **kwargs):
    """Sparse softmax over a local window only: scatterbrain_attention with num_features=0."""
    return scatterbrain_attention(query, key, value, num_features=0, sparse="local", window=window, **kwargs)


@follows_autocast()
def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention (the ground truth), same conventions as scatterbrain_attention.

    Materialises the (N, S) scores: meant for testing and small inputs. Rows whose keys are all
    masked return zeros.
    """
    validate_qkv(query, key, value, key_padding_mask, scale)
    return reference.dense_attention(
        query,
        key,
        value,
        scale=default_scale(scale, query.shape[-1]),
        is_causal=is_causal,
        key_valid=None if key_padding_mask is None else ~key_padding_mask,
    )
