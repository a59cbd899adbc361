"""RingAttentionConfig: every setting of a ring attention module, validated on construction.

Each field says which variants it acts in. A field set away from its default in a
variant where it has no effect warns once (see ``warn_inert_fields``): no field is
silently ignored. Five fields belong to other layers (gradient compression, activation
checkpointing): accepted here, read only through config_adapter.py by their owners.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Union

import torch

from ..sequence.lengths import LengthRules, check_length
from ..sequence.sharding import LAYOUTS
from .config_adapter import ACTING_VARIANT, COMPRESSION_METHODS, OTHER_LAYER_FIELDS
from .kernel_policy import CUDA_KERNELS

#: the variant names, defined here once (registry.py maps each to the class whose ``variant`` it is)
VARIANTS = ("standard", "hilbert", "distributed", "block_sparse")
LAYOUT_CHOICES = ("auto",) + LAYOUTS
SPARSE_PATTERNS = ("local_window", "dilated", "global_local", "random")
GRID_ORDERS = ("hilbert", "frames", "raster")
KERNELS = ("auto", "math") + CUDA_KERNELS
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}

# Which variants each non-universal field acts in. Fields not listed act everywhere.
FIELD_VARIANTS = {
    "use_hilbert": ("hilbert",),
    "hilbert_curve_level": ("hilbert",),
    "grid_shape": ("hilbert",),
    "grid_window": ("hilbert",),
    "grid_order": ("hilbert",),
    "block_size": ("block_sparse",),
    "sparsity_ratio": ("block_sparse",),
    "sparse_pattern": ("block_sparse",),
    "sparse_seed": ("block_sparse",),
    **{name: (ACTING_VARIANT,) for name in OTHER_LAYER_FIELDS},  # forwarded to their owners (config_adapter.py)
}
# What an inert-field warning adds for fields that act by other means than their variant.
FIELD_NOTES = {
    "use_hilbert": "create_ring_attention('standard', use_hilbert=True) builds the hilbert variant",
}


def _as_int_list(name: str, value) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of positive integers, got {value!r}") from None
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {value!r}")
    return out


def resolve_dtype(value) -> Optional[torch.dtype]:
    """Accept a torch.dtype or its name ("bfloat16", "fp16", ...)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"attention_dtype={value!r} is not supported; valid values: {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class RingAttentionConfig:
    """Settings of a ring attention module (docstrings below; the variants they act in: FIELD_VARIANTS)."""

    # --- the attention pattern -------------------------------------------------------
    segment_lengths: Optional[List[int]] = None
    """LongNet segment lengths w_i; None means dense attention over the whole sequence."""
    dilation_rates: Optional[List[int]] = None
    """LongNet dilation rates r_i, one per segment length (default all 1)."""
    dropout: float = 0.0
    """Attention-probability dropout, applied in training mode only."""
    scale: Optional[float] = None
    """Score scale; default 1/sqrt(head_dim)."""

    # --- the ring ---------------------------------------------------------------------
    ring_size: Optional[int] = None
    """Expected sequence-parallel group size; checked against the group at first call."""
    layout: str = "auto"
    """How positions map to ranks: auto | contiguous | zigzag (docs/ARCHITECTURE.md, layouts)."""
    custom_ring_order: Optional[List[int]] = None
    """A permutation of the group's ranks giving the order partners are visited in."""
    async_ring_communication: bool = True
    """Overlap the next step's transfer with the current step's compute."""
    comm_timeout_s: float = 600.0
    """Seconds a ring transfer may take before an error naming the peer ranks is raised."""
    kernel: str = "auto"
    """Block kernel: auto | math | flash | cudnn | efficient (CUDA kernels need CUDA)."""
    compute_block_size: int = 1024
    """Tile edge of the portable (math) kernel: it never holds more scores than one tile
    (block_sparse uses block_size instead, so tiles align with mask blocks)."""

    # --- hilbert variant ------------------------------------------------------------------
    use_hilbert: bool = False
    """Process tokens in Hilbert-curve order: ``create_ring_attention("standard", use_hilbert=True)``
    builds the hilbert variant (with a warning); inert, with a warning, in distributed and
    block_sparse; the hilbert variant always uses the curve (registry.py)."""
    hilbert_curve_level: int = 8
    """Curve level L of the 1-D tile schedule: tiles are visited along a 2^L x 2^L curve
    (no effect with ``grid_shape``, where the curve runs over the token grid instead)."""
    grid_shape: Optional[List[int]] = None
    """Token grid ``[H, W]`` or ``[T, H, W]`` (image or video patches, raster order: last dim
    fastest); prod(grid_shape) must equal the sequence length. Needs ``grid_window``: a query
    then sees only the keys in its box neighbourhood on the grid (grids.py)."""
    grid_window: Optional[List[int]] = None
    """Radius of that neighbourhood per grid dim, in cells (one int: every dim): a query at cell
    c sees the keys at cells c' with ``|c_d - c'_d| <= grid_window[d]`` for every d."""
    grid_order: str = "hilbert"
    """hilbert | frames | raster: the token order the kernels see. ``hilbert`` lays the tokens
    along the generalised Hilbert curve of the whole grid, so a neighbourhood is a few dense
    blocks; ``frames`` (3-D grids) keeps frames in time order, each along its 2-D curve (better
    when the window is much shorter in time than in space); ``raster`` keeps the caller's order
    (the same mask, for comparison). Outputs are always in the caller's order."""

    # --- block_sparse variant -------------------------------------------------------------
    block_size: int = 64
    """Edge of a block of the block mask, in tokens."""
    sparsity_ratio: float = 0.1
    """Fraction of blocks KEPT (0.1 = 90% sparse)."""
    sparse_pattern: str = "local_window"
    """local_window | dilated | global_local | random (seeded)."""
    sparse_seed: int = 0
    """Seed of the random pattern; the mask is identical on every rank and run."""

    # --- other layers' fields, accepted here (config_adapter.py hands them to their owners) ---
    gradient_compression_ratio: Optional[float] = None
    """Fraction of gradient entries kept by topk/randomk compression (strategy hook)."""
    compression_method: str = "topk"
    """none | topk | randomk | powersgd | bf16: the DDP communication hook to install."""
    use_error_feedback: bool = True
    """Carry the compression residual to the next step."""
    use_checkpoint_accumulation: bool = False
    """Activation checkpointing of the layers holding this module; read by the model that owns
    it (LongDocumentLM turns on selective checkpointing), the ring itself stores only q/k/v/out/lse."""
    checkpoint_every_n_layers: int = 1
    """With checkpointing on: checkpoint every n-th layer."""
    # --- execution options, every variant (execution.py) ---------------------------------------
    enable_mixed_precision: bool = False
    """Compute blocks in attention_dtype, accumulate and merge in float32."""
    attention_dtype: Optional[Union[str, torch.dtype]] = None
    """Block dtype under mixed precision (default bfloat16)."""
    validate_gradients: bool = False
    """Raise, naming rank and module, when an input gradient is not finite."""

    # --- profiling and logging --------------------------------------------------------------
    enable_profiling: bool = False
    """Synchronise around phases so compute/comm times are exact (costs overlap)."""
    profile_memory: bool = False
    """Reset the CUDA peak-memory counter at each call so peak_memory_mb is per call."""
    profile_communication: bool = False
    """Keep a per-step record of bytes and partners (get_profiling_stats()['steps'])."""
    log_communication_stats: bool = False
    """Log bytes sent, ring steps and time waited per call at INFO level."""

    # --- memory -------------------------------------------------------------------------------
    max_buffer_size_mb: float = 1024.0
    """Cap on the bytes the receive-buffer pool keeps between steps; buffers beyond it are freed."""
    enable_memory_pool: bool = True
    """Reuse receive buffers across steps and calls."""
    aggressive_memory_cleanup: bool = False
    """Empty the buffer pool (and the CUDA cache) after every call."""

    def __post_init__(self) -> None:
        self.segment_lengths = _as_int_list("segment_lengths", self.segment_lengths)
        self.dilation_rates = _as_int_list("dilation_rates", self.dilation_rates)
        if self.segment_lengths is None and self.dilation_rates is not None:
            if any(r != 1 for r in self.dilation_rates):
                raise ValueError("dilation_rates needs segment_lengths (one segment length per rate)")
            self.dilation_rates = None
        if self.segment_lengths is not None:
            if self.dilation_rates is None:
                self.dilation_rates = [1] * len(self.segment_lengths)
            if len(self.dilation_rates) != len(self.segment_lengths):
                raise ValueError(
                    f"segment_lengths and dilation_rates must have the same length, got "
                    f"{len(self.segment_lengths)} and {len(self.dilation_rates)}"
                )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.ring_size is not None and int(self.ring_size) < 1:
            raise ValueError(f"ring_size must be >= 1 or None, got {self.ring_size}")
        if self.layout not in LAYOUT_CHOICES:
            raise ValueError(f"layout={self.layout!r} is not valid; valid values: {LAYOUT_CHOICES}")
        if self.custom_ring_order is not None:
            order = [int(r) for r in self.custom_ring_order]
            if sorted(order) != list(range(len(order))):
                raise ValueError(
                    f"custom_ring_order must be a permutation of 0..W-1, got {self.custom_ring_order}"
                )
            self.custom_ring_order = order
        if not self.comm_timeout_s > 0:
            raise ValueError(f"comm_timeout_s must be positive, got {self.comm_timeout_s}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not valid; valid values: {KERNELS}")
        if self.compute_block_size < 1:
            raise ValueError(f"compute_block_size must be >= 1, got {self.compute_block_size}")
        if not 1 <= self.hilbert_curve_level <= 16:
            raise ValueError(f"hilbert_curve_level must be in 1..16, got {self.hilbert_curve_level}")
        self._check_grid()
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.sparsity_ratio <= 1.0:
            raise ValueError(
                f"sparsity_ratio is the fraction of blocks kept and must be in (0, 1], got {self.sparsity_ratio}"
            )
        if self.sparse_pattern not in SPARSE_PATTERNS:
            raise ValueError(f"sparse_pattern={self.sparse_pattern!r} is not valid; valid values: {SPARSE_PATTERNS}")
        if self.gradient_compression_ratio is not None and not 0.0 < self.gradient_compression_ratio <= 1.0:
            raise ValueError(
                f"gradient_compression_ratio must be in (0, 1] or None, got {self.gradient_compression_ratio}"
            )
        if self.compression_method not in COMPRESSION_METHODS:
            raise ValueError(
                f"compression_method={self.compression_method!r} is not valid; valid values: {COMPRESSION_METHODS}"
            )
        if self.checkpoint_every_n_layers < 1:
            raise ValueError(f"checkpoint_every_n_layers must be >= 1, got {self.checkpoint_every_n_layers}")
        self.attention_dtype = resolve_dtype(self.attention_dtype)
        if self.max_buffer_size_mb <= 0:
            raise ValueError(f"max_buffer_size_mb must be positive, got {self.max_buffer_size_mb}")

    def _check_grid(self) -> None:
        """grid_shape / grid_window / grid_order: shapes and radii that make a neighbourhood mask."""
        if self.grid_order not in GRID_ORDERS:
            raise ValueError(f"grid_order={self.grid_order!r} is not valid; valid values: {GRID_ORDERS}")
        if self.grid_shape is None and self.grid_window is None:
            return
        if self.grid_shape is None or self.grid_window is None:
            raise ValueError(
                f"grid_shape and grid_window go together (a token grid and the neighbourhood radius on it), "
                f"got grid_shape={self.grid_shape!r}, grid_window={self.grid_window!r}")
        self.grid_shape = _as_int_list("grid_shape", self.grid_shape)
        if len(self.grid_shape) not in (2, 3):
            raise ValueError(f"grid_shape must be [H, W] or [T, H, W], got {self.grid_shape}")
        window = [self.grid_window] if isinstance(self.grid_window, int) else self.grid_window
        try:
            window = [int(r) for r in window]
        except (TypeError, ValueError):
            raise ValueError(f"grid_window must be an int or a list of ints, got {self.grid_window!r}") from None
        if len(window) == 1:
            window = window * len(self.grid_shape)
        if len(window) != len(self.grid_shape) or any(r < 0 for r in window):
            raise ValueError(f"grid_window must be one non-negative int or one per grid dim "
                             f"({len(self.grid_shape)} for grid_shape={self.grid_shape}), got {self.grid_window!r}")
        self.grid_window = window
        if self.grid_order == "frames" and len(self.grid_shape) != 3:
            raise ValueError(f"grid_order='frames' orders the frames of a [T, H, W] grid; grid_shape={self.grid_shape} "
                             f"is 2-D: use grid_order='hilbert' or 'raster'")
        if self.segment_lengths is not None:
            raise ValueError("grid_shape needs segment_lengths=None: the grid window is the attention "
                             f"pattern (got segment_lengths={self.segment_lengths})")

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    def patterns(self, seq_len: int) -> List[tuple]:
        """The (segment_length, dilation_rate) pairs for a sequence of ``seq_len``.

        Segments longer than the sequence are clamped to it; the sequence must be a
        multiple of every clamped segment (ValueError with the length that works, lengths.py).
        """
        if self.segment_lengths is None:
            return [(seq_len, 1)]
        check_length(seq_len, self.length_rules())
        return [(min(w, seq_len), r) for w, r in zip(self.segment_lengths, self.dilation_rates)]

    def length_rules(self, group_size: int = 1, layout: str = "contiguous", variant: str = "standard") -> LengthRules:
        """What this config asks of the sequence length over ``group_size`` ranks (lengths.py)."""
        block = self.block_size if variant in FIELD_VARIANTS["block_size"] else None
        return LengthRules(self.segment_lengths, self.dilation_rates, group_size, layout, block)

    def warn_inert_fields(self, variant: str) -> None:
        """Warn once per field that is set but has no effect in ``variant``."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, acting in FIELD_VARIANTS.items():
            if variant in acting:
                continue
            value = getattr(self, name)
            if value != defaults[name]:
                note = f"; {FIELD_NOTES[name]}" if name in FIELD_NOTES else ""
                warnings.warn(
                    f"RingAttentionConfig.{name}={value!r} has no effect in the {variant!r} "
                    f"variant (it acts in: {', '.join(acting)}{note})",
                    UserWarning,
                    stacklevel=3,
                )

