"""MultiheadRingAttention: embed_dim/num_heads wrapper with q/k/v/out projections."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import RingAttentionConfig
from .registry import build_variant


class MultiheadRingAttention(nn.Module):
    """Projections around a ring attention core (any variant).

    Args:
        embed_dim: model width E.
        num_heads: query heads H (E % H == 0).
        num_kv_heads: kv heads K for grouped-query attention (H % K == 0); default H.
        bias: bias in the projections.
        variant: standard | hilbert | distributed | block_sparse.
        config / **fields: the core's RingAttentionConfig.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, bias: bool = True,
                 variant: str = "standard", config: Optional[RingAttentionConfig] = None, **fields) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attention = build_variant(variant, config, **fields)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                is_causal: bool = False, already_split: bool = False) -> torch.Tensor:
        """query/key/value (B, T, E) (key, value default to query) -> (B, T, E)."""
        key = query if key is None else key
        value = key if value is None else value
        B, T, _ = query.shape
        q = self.q_proj(query).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(key).view(B, key.shape[1], self.num_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(value).view(B, value.shape[1], self.num_kv_heads, self.head_dim)
        out = self.attention(q, k, v, is_causal=is_causal, already_split=already_split)  # (B, T, H, D)
        return self.out_proj(out.reshape(B, out.shape[1], self.embed_dim))

    def get_profiling_stats(self) -> dict:
        return self.attention.get_profiling_stats()

    def clear_memory_pool(self) -> None:
        self.attention.clear_memory_pool()
