"""FAVOR+ positive random features (Performer) and the random draws the package uses.

phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), with W in R^{m x D}, rows marginally N(0, I).
E_W[phi(x) . phi(y)] = exp(x . y) exactly, for any x, y (the estimator is unbiased).

The "hyperbolic" variant uses [W; -W] (2m rows, each still marginally N(0, I)), which is the same
formula with twice the rows: lower variance, same expectation. `effective_feature_matrix` returns the
matrix the feature map actually uses, so every consumer (reference, kernels) handles one case.
"""

from __future__ import annotations

import math
import numbers

import torch

FEATURE_TYPES = ("positive", "hyperbolic")


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed`, or None (use torch's global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(check_seed(seed, upper=2**64))
    return gen


def check_seed(seed, upper: int = 2**63) -> int:
    """seed as a Python int: an integral value (not bool) in [-2**63, upper). The functional API
    takes what torch.Generator.manual_seed takes (upper 2**64: torch.seed() returns such values);
    modules keep their seed in an int64 buffer (upper 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} ({seed!r})")
    if not -2**63 <= seed < upper:
        what = "an int64" if upper == 2**63 else "as torch.Generator.manual_seed"
        raise ValueError(f"seed must be in [-2**63, 2**{upper.bit_length() - 1}) ({what}), got {seed}")
    return int(seed)


def draw_feature_matrix(
    num_features: int,
    head_dim: int,
    *,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
) -> torch.Tensor:
    """Draw W (num_features, head_dim), float32, on the CPU.

    Orthogonal random features: blocks of head_dim orthonormal directions (QR of a Gaussian matrix,
    with Q's columns multiplied by sign(diag(R)) so that the directions are Haar-uniform), each row
    rescaled by the norm of an independent Gaussian head_dim-vector, so every row is marginally
    N(0, I). Drawn in float64 and rounded once, so a seed gives the same W on every machine.
    """
    if num_features < 0:
        raise ValueError(f"num_features must be >= 0, got {num_features}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    if num_features == 0:
        return torch.zeros(0, head_dim, dtype=torch.float32)
    if not orthogonal:
        w = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64)
        return w.float()
    n_blocks = math.ceil(num_features / head_dim)
    gauss = torch.randn(n_blocks, head_dim, head_dim, generator=generator, dtype=torch.float64)
    qmat, rmat = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    qmat = qmat * signs.unsqueeze(-2)  # multiply column j of Q by sign(R_jj)
    directions = qmat.transpose(-2, -1).reshape(n_blocks * head_dim, head_dim)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=-1)
    return (directions * norms.unsqueeze(-1)).float()


def effective_feature_matrix(feature_matrix: torch.Tensor, feature_type: str) -> torch.Tensor:
    """The rows the feature map uses: W for 'positive', [W; -W] for 'hyperbolic'."""
    if feature_type == "positive":
        return feature_matrix
    if feature_type == "hyperbolic":
        return torch.cat([feature_matrix, -feature_matrix], dim=0)
    raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")


def feature_logits(x: torch.Tensor, feature_matrix: torch.Tensor) -> torch.Tensor:
    """log(sqrt(m) phi(x)) = W x - |x|^2 / 2, shape (..., m). x is already scaled by sqrt(tau)."""
    return x @ feature_matrix.to(x.dtype).transpose(-1, -2) - 0.5 * (x * x).sum(-1, keepdim=True)


def positive_features(x: torch.Tensor, feature_matrix: torch.Tensor) -> torch.Tensor:
    """phi(x) = exp(W x - |x|^2/2) / sqrt(m), unstabilised (for tests and small diagnostics)."""
    m = feature_matrix.shape[-2]
    return torch.exp(feature_logits(x, feature_matrix)) / math.sqrt(m)


def draw_hash_projections(
    n_hashes: int, head_dim: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian projections a_r in R^{head_dim + 2}, one per hashing round, float32 on the CPU.

    Used on the asymmetric (XBOX+) transform of queries and keys; see `scatterattn.sparsity`.
    """
    if n_hashes < 1:
        raise ValueError(f"n_hashes must be >= 1, got {n_hashes}")
    return torch.randn(n_hashes, head_dim + 2, generator=generator, dtype=torch.float64).float()
