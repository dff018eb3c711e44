"""nn.Module wrappers that own their random parameters."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import ScatterbrainConfig
from .features import check_seed, make_generator
from .functional import BACKENDS, draw_random_parameters, follows_autocast, prepare, run_prepared, validate_qkv

_GOLDEN = 0x9E3779B97F4A7C15
_RANDOM_BUFFERS = ("feature_matrix", "hash_projections")
_KEPT_BUFFERS = ("seed", "draws", "steps", *_RANDOM_BUFFERS)  # values kept through casts and to_empty


def _forget_host_steps(module, incompatible_keys) -> None:
    module._host_steps = None


class ScatterbrainAttention(nn.Module):
    """Scatterbrain attention core: forward(q, k, v) -> out, shapes as `scatterbrain_attention`.

    Owns the random feature matrix W (num_features, head_dim) and the LSH projections
    (n_hashes, head_dim + 2) as float32 buffers, saved in and restored from `state_dict` together
    with the seed and the draw and step counters, so a reloaded module gives the same outputs.
    Casting the module (`.half()`, `.to(torch.bfloat16)`) moves these buffers but keeps them float32.

    Redraw policy: `redraw_interval=None` (or 0) never redraws; k > 0 redraws before every k-th
    training-mode forward (steps k, 2k, ...); `redraw()` redraws on request. Draw i comes from a
    generator seeded with a function of (seed, i): the sequence of matrices is fixed by the seed.
    A redraw writes into the buffers (captured CUDA graphs see it); training-mode calls with a
    redraw schedule use copies of them, so a forward whose backward is still pending keeps the
    matrices it used when a later call redraws. Forwards run during a backward pass (activation
    checkpointing's recomputation) do not count as steps: they use the current matrices, those
    of the forward they recompute as long as the module did not redraw in between (a module
    called several times per step under checkpointing should redraw with `redraw()` between
    steps instead). Under torch.compile the schedule is host code run eagerly: a graph break in
    training mode with a redraw_interval (`fullgraph=True` needs redraw_interval=None there).
    """

    def __init__(
        self,
        head_dim: int,
        *,
        num_features: int = 256,
        feature_type: str = "positive",
        sparse: str = "lsh",
        bucket_size: int = 128,
        n_hashes: int = 1,
        window: int = 128,
        redraw_interval: int | None = None,
        seed: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if redraw_interval is not None and (
            isinstance(redraw_interval, bool) or not isinstance(redraw_interval, int) or redraw_interval < 0
        ):
            raise ValueError(f"redraw_interval must be None or an int >= 0, got {redraw_interval!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = ScatterbrainConfig(
            num_features=num_features,
            feature_type=feature_type,
            sparse=sparse,
            bucket_size=bucket_size,
            n_hashes=n_hashes,
            window=window,
        )
        self.head_dim = head_dim
        self.redraw_interval = redraw_interval or 0
        self.backend = backend
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item()) if seed is None else check_seed(seed)
        # Built under torch.device("meta") (deferred initialisation), these few small buffers are
        # made on the CPU with their values, which `to_empty` then keeps (see _apply).
        meta = torch.get_default_device().type == "meta"
        with torch.device("cpu") if meta else contextlib.nullcontext():
            self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
            self.register_buffer("draws", torch.tensor(0, dtype=torch.int64))
            self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
            features, projections = self._draw(0)
            self.register_buffer("feature_matrix", features)
            self.register_buffer("hash_projections", projections)
        self._host_steps: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_steps)

    def _draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen_seed = (int(self.seed) + index * _GOLDEN) % (2**63)
        features, projections = draw_random_parameters(
            self.config, self.head_dim, generator=make_generator(gen_seed)
        )
        if features is None:
            features = torch.zeros(0, self.head_dim)
        if projections is None:
            projections = torch.zeros(0, self.head_dim + 2)
        return features, projections

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw the next feature matrix and hash projections of this module's sequence."""
        self.draws += 1
        features, projections = self._draw(int(self.draws))
        self.feature_matrix.copy_(features.to(self.feature_matrix.device))
        self.hash_projections.copy_(projections.to(self.hash_projections.device))

    def _random_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature matrix, hash projections) for one call: the buffers, or, in training mode with a
        redraw schedule, copies of them (two m x D copies per call), so that autograd keeps the
        matrices this call used when a later call redraws into the buffers before its backward."""
        if self.training and self.redraw_interval:
            return self.feature_matrix.clone(), self.hash_projections.clone()
        return self.feature_matrix, self.hash_projections

    def _advance_schedule(self) -> None:
        """Count a training-mode forward and redraw before every redraw_interval-th one."""
        if self.training and self.redraw_interval:
            self._count_step()

    @torch.compiler.disable  # host-side counting: run eagerly, not traced (a traced int would recompile each step)
    def _count_step(self) -> None:
        """The count lives in the `steps` buffer (state_dict); a host copy avoids reading the buffer
        back from the GPU on every step (it is re-read once after load_state_dict). A forward run
        during a backward pass (checkpointing's recomputation) is not a step."""
        if torch._C._current_graph_task_id() == -1:
            steps = int(self.steps) if self._host_steps is None else self._host_steps
            if steps > 0 and steps % self.redraw_interval == 0:
                self.redraw()
            self.steps += 1
            self._host_steps = steps + 1

    @follows_autocast(method=True)
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float | None = None,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        validate_qkv(query, key, value, key_padding_mask, scale)  # before the schedule moves
        if query.shape[-1] != self.head_dim:
            raise ValueError(
                f"query head_dim {query.shape[-1]} does not match this module's head_dim {self.head_dim}"
            )
        self._advance_schedule()
        features, projections = self._random_parameters()
        prepared = prepare(
            query,
            key,
            value,
            self.config,
            scale=scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            feature_matrix=features if self.config.has_low_rank else None,
            hash_projections=projections if self.config.sparse == "lsh" else None,
            inputs_validated=True,
        )
        return run_prepared(query, key, value, prepared, self.backend)

    def _apply(self, fn, recurse=True):
        # Keep the random matrices float32 whatever dtype the module is cast to (rounding W to
        # bf16 would change the estimator) and keep the values of them and of the counters through
        # `to_empty`; only follow the device move. (A buffer already on the meta device has no
        # values to keep: it becomes what fn makes of it, as any buffer.)
        kept = {name: self._buffers[name] for name in _KEPT_BUFFERS}
        result = super()._apply(fn, recurse)
        for name, original in kept.items():
            if original.is_meta:
                continue
            target = fn(torch.empty(0, dtype=original.dtype, device=original.device))
            self._buffers[name] = original.to(device=target.device)
        return result

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"head_dim={self.head_dim}, num_features={c.num_features}, feature_type={c.feature_type!r}, "
            f"sparse={c.sparse!r}, bucket_size={c.bucket_size}, n_hashes={c.n_hashes}, window={c.window}, "
            f"redraw_interval={self.redraw_interval}, backend={self.backend!r}"
        )
