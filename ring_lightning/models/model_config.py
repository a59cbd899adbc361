"""ModelConfig and PRESETS: the sizes and options of a LongDocTransformer (model.py).

Kept apart from the modules so a config can be read, validated and registered with Hydra
(hydra_presets.py) without building anything. ``ring_lightning.models.model`` re-exports both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

CHECKPOINTING = ("none", "selective", "full")

# SwiGLU hidden sizes are rounded up to a multiple of this so matmuls stay tensor-core friendly.
_FFN_MULTIPLE = 64


@dataclass
class ModelConfig:
    """Sizes and options of a LongDocTransformer."""

    vocab_size: int = 259
    """Vocabulary size. 259 = 256 bytes + PAD/BOS/EOS of the default byte tokenizer. Under train.py it
    follows ``data.tokenizer`` unless set (hydra_presets.py); in Python pass ``datamodule.model_vocab_size``."""
    dim: int = 256
    """Model (residual stream) width C."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 8
    """Query heads H; head_dim = dim // n_heads must be even (rotary pairs)."""
    n_kv_heads: Optional[int] = None
    """Key/value heads K for grouped-query attention; None means n_heads. n_heads % n_kv_heads == 0."""
    hidden_dim: Optional[int] = None
    """SwiGLU hidden width; None derives 8/3 * dim rounded up to a multiple of 64 (LLaMA)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base; larger values (e.g. 500000) suit longer contexts."""
    checkpointing: str = "none"
    """Activation checkpointing: none | selective (blocks 0, n, 2n, ... recompute everything
    but the attention core, whose inputs and outputs are kept) | full (every block recomputed whole)."""
    checkpoint_every_n_layers: int = 1
    """With checkpointing="selective": checkpoint blocks 0, n, 2n, ..."""
    offload_activations: bool = False
    """With checkpointing="full": what is kept of each checkpointed group (its input, the
    residual stream) goes to pinned host memory on a side stream and comes back one group
    ahead in backward (ring_lightning/models/activations.py). Same numbers (recomputed), less device memory."""
    blocks_per_checkpoint: int = 1
    """With checkpointing="full": k blocks recomputed together, one saved input per k blocks
    (host memory with offload: ceil(n_layers / k) inputs)."""
    mlp_tile_tokens: int = 0
    """The pieces around each attention core (norms, projections, rotary, SwiGLU) over
    sequence tiles of this many tokens, forward and backward: they keep only their inputs and
    no (T, hidden_dim) intermediate of the whole shard is alive at once; 0 = no tiles."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections scaled by 1/sqrt(2*n_layers))."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "checkpoint_every_n_layers",
                     "blocks_per_checkpoint"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                f"(valid values: the divisors of {self.n_heads})"
            )
        if self.dim % self.n_heads != 0 or (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(
                f"ModelConfig.dim={self.dim} must be a multiple of n_heads={self.n_heads} with an even "
                f"head_dim (rotary embeddings rotate pairs of channels)"
            )
        if self.hidden_dim is None:
            self.hidden_dim = _FFN_MULTIPLE * math.ceil(8 * self.dim / 3 / _FFN_MULTIPLE)
        if self.hidden_dim < 1:
            raise ValueError(f"ModelConfig.hidden_dim must be positive or None, got {self.hidden_dim}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"ModelConfig.checkpointing={self.checkpointing!r} is not valid; valid values: {CHECKPOINTING}"
            )
        if not isinstance(self.mlp_tile_tokens, int) or self.mlp_tile_tokens < 0:
            raise ValueError(f"ModelConfig.mlp_tile_tokens must be an integer >= 0 (0 = no tiling), "
                             f"got {self.mlp_tile_tokens!r}")
        if self.offload_activations and self.checkpointing != "full":
            raise ValueError(
                f"ModelConfig.offload_activations=True needs checkpointing='full' (got "
                f"{self.checkpointing!r}): only full checkpointing keeps one tensor per group that can "
                f"live on the host; use checkpointing=offload (full + offload + MLP tiles)")
        if self.blocks_per_checkpoint > 1 and self.checkpointing != "full":
            raise ValueError(
                f"ModelConfig.blocks_per_checkpoint={self.blocks_per_checkpoint} applies to "
                f"checkpointing='full' only (got {self.checkpointing!r}); selective uses "
                f"checkpoint_every_n_layers")
        if not self.norm_eps > 0 or not self.rope_theta > 0 or not self.init_std > 0:
            raise ValueError("ModelConfig.norm_eps, rope_theta and init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size, optionally with fields overridden.

        Args:
            name: one of ``PRESETS``: tiny (CPU tests), small (CPU runs), 350m, 1b, 3b, 8b.
            **overrides: any ModelConfig field.

        Raises:
            ValueError: unknown preset or field.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid values: {tuple(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_any(cls, value: Union["ModelConfig", dict, None]) -> "ModelConfig":
        """Accept a ModelConfig, a (Hydra) mapping of fields, or a mapping with a ``preset`` key."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        try:
            data = dict(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"model must be a ModelConfig or a mapping of its fields, got {type(value).__name__}"
            ) from None
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.preset(preset, **data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(known)} (or 'preset')")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


# Field overrides over the ModelConfig defaults (kept as mappings so that overriding
# ``dim`` re-derives ``hidden_dim``). Parameter counts are with the byte vocabulary. The one
# source of the sizes: Hydra's ``model=<name>`` group is registered from this table
# (ring_lightning/app/hydra_presets.py).
PRESETS = {
    # ~0.13M parameters: unit tests, CI, the default CPU run and the retrieval task.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    # ~3M parameters: a few hundred CPU steps in minutes.
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4),
    # ~340M parameters, head_dim 64: one-GPU runs (the larger rotary base suits long contexts).
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, hidden_dim=3584, rope_theta=500000.0),
    # ~1.0B parameters, LLaMA-3.2-1B shapes, head_dim 64: multi-GPU runs.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0),
    # ~3.6B parameters, LLaMA-3.2-3B shapes (head_dim 128; its head here is not tied to the embedding):
    # sharded with strategy=ring_fsdp, on one GPU with strategy.offload_params=true.
    "3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0),
    # ~8.0B parameters, LLaMA-3.1-8B shapes: strategy=ring_fsdp on a node of 8.
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, rope_theta=500000.0),
}
