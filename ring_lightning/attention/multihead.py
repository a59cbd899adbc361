"""MultiheadRingAttention: ``nn.MultiheadAttention``'s shape around a ring attention core.

Same constructor order (``embed_dim, num_heads, dropout, bias``), same ``batch_first``
(default False: (T, B, E) like torch), same return value: ``(out, weights)``, so
``out, _ = mha(x, x, x)`` works as with torch. ``weights`` is None with
``need_weights=False``; with ``need_weights=True`` (torch's default) they are computed
wherever one device holds the whole sequence, for every pattern: like torch, an (B, T, S)
matrix averaged over heads, or (B, H, T, S) with ``average_attn_weights=False``, the weight
each value gets in the output (``out = weights @ v`` per head, before ``out_proj``). Masks
(the call's masks, mask_protocol.py: causal, block grid, packed documents, grid window) zero
the weights they exclude; dilated
patterns are separate softmaxes merged by their denominators (LongNet), which equals one
softmax over all patterns' keys (reference.py), so a key's weight is summed over the patterns
that select it. Unlike torch's, before dropout: the ring applies dropout inside its kernels,
so with dropout > 0 these are the undropped weights. Under a split sequence the full weights
are never formed (that is the point of the ring): a ValueError says to pass
``need_weights=False``. ``attn_mask`` / ``key_padding_mask`` are not supported: use
``is_causal=True`` and ``document_ids=`` (packed documents).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import RingAttentionConfig
from .registry import build_variant


class MultiheadRingAttention(nn.Module):
    """Projections around a ring attention core (any variant), shaped like ``nn.MultiheadAttention``.

    Args:
        embed_dim: model width E.
        num_heads: query heads H (E % H == 0).
        dropout: attention-probability dropout (the core's ``RingAttentionConfig.dropout``).
        bias: bias in the projections.
        batch_first: True: inputs and output are (B, T, E); False (torch's default): (T, B, E).
        num_kv_heads: kv heads K for grouped-query attention (H % K == 0); default H.
        variant: standard | hilbert | distributed | block_sparse.
        config / **fields: the core's RingAttentionConfig.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, *,
                 batch_first: bool = False, num_kv_heads: Optional[int] = None, variant: str = "standard",
                 config: Optional[RingAttentionConfig] = None, **fields) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if dropout:
            fields["dropout"] = dropout
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attention = build_variant(variant, config, **fields)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False,
                *, already_split: bool = False, document_ids: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """query/key/value (B, T, E) with ``batch_first`` else (T, B, E); key and value default to
        query. Returns ``(out, weights)``: out shaped like query; weights as the module docstring says.

        Raises:
            ValueError: a mask argument, inputs that are not 3-D, or ``need_weights=True`` where
                the weights are never formed (pass ``need_weights=False``).
        """
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("MultiheadRingAttention takes no attn_mask / key_padding_mask: pass is_causal=True "
                             "for a causal mask and document_ids=(B, T) ids for packed documents")
        key = query if key is None else key
        value = key if value is None else value
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3:
                layout = "(batch, seq, embed_dim)" if self.batch_first else "(seq, batch, embed_dim)"
                raise ValueError(f"{name} must be {layout} (batch_first={self.batch_first}), got {tuple(x.shape)}")
        if not self.batch_first:  # (T, B, E) -> (B, T, E) views
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        B, T, _ = query.shape
        q = self.q_proj(query).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(key).view(B, key.shape[1], self.num_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(value).view(B, value.shape[1], self.num_kv_heads, self.head_dim)
        weights = None
        if need_weights:
            self._check_weights_exist(already_split, document_ids)
            weights = self._weights(q, k, is_causal, average_attn_weights, document_ids)
        out = self.attention(q, k, v, is_causal=is_causal, already_split=already_split,
                             document_ids=document_ids, qkv_layout="bthd")  # (B, T, H, D)
        out = self.out_proj(out.reshape(B, out.shape[1], self.embed_dim))  # (B, T, E)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _check_weights_exist(self, already_split: bool, document_ids) -> None:
        group, _ = self.attention._sharding()
        if already_split or (group is not None and dist.get_world_size(group) > 1):
            raise ValueError("need_weights=True: the attention weights are never formed as one matrix here "
                             "(the sequence is split over ranks); pass need_weights=False (weights is then None)")

    def _weights(self, q, k, is_causal: bool, average: bool, document_ids=None) -> torch.Tensor:
        """The weights of every value in the output on one device: (B, T, S) averaged over heads
        or (B, H, T, S), under the core's whole pattern (the masks of reference.py)."""
        from .reference import pattern_mask

        cfg = self.attention.config
        scale = cfg.scale or 1.0 / math.sqrt(self.head_dim)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)  # (B, S, H, D)
        dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 inputs: float32 scores; float64 stays
        scores = torch.einsum("bthd,bshd->bhts", q.to(dtype), k.to(dtype)) * scale  # (B, H, T, S)
        T, S, H = scores.shape[-2], scores.shape[-1], self.num_heads
        ids = None if document_ids is None else document_ids.to(q.device)
        # every mask of the call (causal, the variant's, documents), shared by every pattern
        extra = self.attention.masks(S, is_causal, ids).dense(S, q.device)[:, None, :T]  # (1|B, 1, T, S)
        patterns = cfg.patterns(S) if cfg.segment_lengths is not None else [(S, 1)]
        masked = [scores.masked_fill(~(pattern_mask(S, H, w, r, False, q.device)[:, :T] & extra), float("-inf"))
                  for w, r in patterns]  # each (B, H, T, S)
        probs = torch.cat(masked, dim=-1).softmax(dim=-1).nan_to_num(0.0)  # one softmax: the LongNet merge
        weights = probs.view(*scores.shape[:-1], len(patterns), S).sum(dim=-2).to(q.dtype)  # (B, H, T, S)
        return weights.mean(dim=1) if average else weights

    def get_profiling_stats(self) -> dict:
        return self.attention.get_profiling_stats()

    def clear_memory_pool(self) -> None:
        self.attention.clear_memory_pool()
