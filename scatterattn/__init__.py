"""scatterattn: Scatterbrain (sparse + low-rank) attention and chained low-rank attention gradients.

Public API:
  scatterbrain_attention, performer_attention, lsh_attention, local_attention, dense_attention
  ScatterbrainConfig, ScatterbrainAttention
  chained_lowrank_attention, ChainedLowRankAttention: exact forward, chained low-rank backward
  diagnostics: attention_support, implied_attention, approximation_error
"""

from .config import ScatterbrainConfig
from .diagnostics import approximation_error, attention_support, implied_attention
from .functional import (
    dense_attention,
    local_attention,
    lsh_attention,
    performer_attention,
    scatterbrain_attention,
)
from .lora import ChainedLowRankAttention, chained_lowrank_attention
from .modules import ScatterbrainAttention

__version__ = "0.1.0"

__all__ = [
    "ChainedLowRankAttention",
    "ScatterbrainAttention",
    "ScatterbrainConfig",
    "approximation_error",
    "attention_support",
    "chained_lowrank_attention",
    "dense_attention",
    "implied_attention",
    "local_attention",
    "lsh_attention",
    "performer_attention",
    "scatterbrain_attention",
]
