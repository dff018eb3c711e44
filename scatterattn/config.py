"""Approximation settings shared by the functional API, the module and the kernels."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .features import FEATURE_TYPES

SPARSE_SOURCES = ("lsh", "local", "none")


def _check_int(name: str, value, minimum: int) -> int:
    """value as a Python int (any integral type but bool: numpy integers too), >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class ScatterbrainConfig:
    """What Scatterbrain approximates with.

    num_features: random features m of the low-rank (Performer) part; 0 means no low-rank part.
    feature_type: 'positive' (FAVOR+) or 'hyperbolic' ([W; -W], 2m features, lower variance).
    sparse: source of the exact sparse part: 'lsh' (SMYRF-style buckets), 'local' (window) or 'none'.
    bucket_size: keys per LSH bucket (each query attends exactly that many keys per round).
    n_hashes: LSH rounds; the support is their union, a pair found twice counts once.
    window: local window width; pairs with |i - j| <= window // 2 are exact.
    """

    num_features: int = 256
    feature_type: str = "positive"
    sparse: str = "lsh"
    bucket_size: int = 128
    n_hashes: int = 1
    window: int = 128

    def __post_init__(self):
        object.__setattr__(self, "num_features", _check_int("num_features", self.num_features, 0))
        if self.feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}")
        if self.sparse not in SPARSE_SOURCES:
            raise ValueError(f"sparse must be one of {SPARSE_SOURCES}, got {self.sparse!r}")
        for name, minimum in (("bucket_size", 1), ("n_hashes", 1), ("window", 0)):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum))
        if self.num_features == 0 and self.sparse == "none":
            raise ValueError("num_features=0 with sparse='none' leaves nothing to attend with")

    @property
    def has_low_rank(self) -> bool:
        return self.num_features > 0

    @property
    def effective_features(self) -> int:
        """Rows of the feature map: m, or 2m for the hyperbolic variant."""
        return self.num_features * (2 if self.feature_type == "hyperbolic" else 1)
