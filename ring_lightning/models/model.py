"""LongDocTransformer: a decoder-only language model for very long documents.

A LLaMA-style stack (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
Models"): pre-norm blocks of RMSNorm (Zhang & Sennrich 2019) -> grouped-query attention
(Ainslie et al. 2023, "GQA") with rotary position embeddings (Su et al. 2021,
"RoFormer") -> RMSNorm -> SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve
Transformer"), then a final RMSNorm and an untied LM head.

The model knows nothing about process groups. Two things are passed in:

* the attention core of each layer, built by ``attention_factory(layer_idx)`` and called
  as ``core(q, k, v, is_causal=True, already_split=True)``. ``already_split=True`` always:
  the model computes on whatever shard of the sequence it is given (the whole sequence
  on one device); a ring attention core exchanges keys and values with the other ranks.
* the GLOBAL positions of the tokens it holds (``position_ids``). Rotary embeddings are
  computed from them, never from ``arange``, so a rank holding positions 4096..8191 (or
  the two zigzag chunks of a sequence) rotates queries and keys exactly as the single
  device model would.
* optionally ``document_ids`` (packed documents), handed to every core as
  ``core(..., document_ids=ids)`` so attention stays inside each document.

Letters in tensor names: B batch, T local sequence length, H query heads, K kv heads,
D head dim, C model dim (``config.dim``), V vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ring_lightning.models.activations import HostOffload, recompute_offloaded, tiled
from ring_lightning.models.flops import attention_pairs, flops_from_pairs

from ring_lightning.models.model_config import CHECKPOINTING, PRESETS, ModelConfig  # noqa: F401 (re-exported)


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions of tokens nobody gave positions to: arange(T) per row, (B, T) long.

    The one default: the model and LongDocumentLM.prepare_batch both use it. A sharder
    (RingStrategy) gives each shard its GLOBAL positions instead (sharding.sequence_positions).
    """
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)  # (T,) -> (B, T)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 so bf16 activations do not lose range."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoFormer rotary embeddings at arbitrary (global) positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        # Not persistent: it is a function of the config, so checkpoints stay portable.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, T, 1, D/2), float32."""
        # Angles in float64: at position 1e6 a float32 product is off by ~0.06 rad,
        # which would make rank-local and single-device rotations disagree.
        angles = position_ids.to(torch.float64)[..., None] * self.inv_freq.to(position_ids.device)  # (B, T, D/2)
        angles = angles[:, :, None, :]  # (B, T, 1, D/2): broadcast over heads
        return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x by the angles in cos/sin (rotate-half form)."""
    x = x_BTHD.float()
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, H, D)
    return out.type_as(x_BTHD)


class Attention(nn.Module):
    """q/k/v/o projections around a pluggable attention core (GQA, RoPE from positions)."""

    def __init__(self, config: ModelConfig, core: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.core = core  # a submodule, so the strategy finds ring modules in model.modules()
        self._core_takes_documents = _accepts(core, "document_ids")

    def qkv(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projected, rotated q (B, T, H, D) and k, v (B, T, K, D)."""
        B, T, _ = x_BTC.shape
        q = self.wq(x_BTC).view(B, T, self.n_heads, self.head_dim)  # (B, T, H*D) -> (B, T, H, D)
        k = self.wk(x_BTC).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K*D) -> (B, T, K, D)
        v = self.wv(x_BTC).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K*D) -> (B, T, K, D)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def project_out(self, out_BTHD: torch.Tensor) -> torch.Tensor:
        B, T = out_BTHD.shape[:2]
        return self.wo(out_BTHD.reshape(B, T, self.n_heads * self.head_dim))  # (B, T, H*D) -> (B, T, C)

    def attend(self, q, k, v, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The core: (B, T, H, D). ``document_ids`` only when given, so cores without it still fit."""
        if document_ids is None:
            return self.core(q, k, v, is_causal=True, already_split=True)
        if not self._core_takes_documents:
            raise TypeError(
                f"the attention core {type(self.core).__name__} does not accept document_ids, but the batch has "
                f"document_ids (packed documents): add a document_ids=None argument to its forward and mask "
                f"with it, or turn the mask off with module.document_mask=false "
                f"(LongDocumentLM(document_mask=False))")
        return self.core(q, k, v, is_causal=True, already_split=True, document_ids=document_ids)

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.qkv(x_BTC, cos, sin)
        return self.project_out(self.attend(q, k, v, document_ids))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, core: nn.Module):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, core)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.mlp_tile_tokens = config.mlp_tile_tokens

        # Compiled versions of the parts around the attention core (compile_pieces()); the
        # core itself stays eager: it communicates and picks kernels at run time.
        self._compiled: Optional[tuple] = None

    def _pre_attention(self, x, cos, sin):
        return self.attention.qkv(self.attention_norm(x), cos, sin)

    def _post_attention(self, x, out_BTHD):
        x = x + self.attention.project_out(out_BTHD)
        return x + self.feed_forward(self.ffn_norm(x))

    def _piece_params(self):
        """Parameters of the pieces before and after the core (the tiles' explicit inputs)."""
        a = self.attention
        pre = [*self.attention_norm.parameters(), a.wq.weight, a.wk.weight, a.wv.weight]
        post = [a.wo.weight, *self.ffn_norm.parameters(), *self.feed_forward.parameters()]
        return [p for p in pre if p.requires_grad], [p for p in post if p.requires_grad]

    def compile_pieces(self, **compile_kwargs) -> None:
        """torch.compile the norms, projections, rotary and SwiGLU (fused element-wise work)."""
        self._compiled = (torch.compile(self._pre_attention, **compile_kwargs),
                          torch.compile(self._post_attention, **compile_kwargs))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keep_attention: bool = False, document_ids: Optional[torch.Tensor] = None,
                values_needed: bool = True) -> torch.Tensor:
        """One block; ``keep_attention``: recompute everything in backward except the core.

        At long context the attention core is most of the FLOPs, and it already keeps only
        q/k/v/out/lse for its backward, so recomputing the cheap parts around it and never the
        core saves most of the activation memory at a few percent of extra compute.

        With ``mlp_tile_tokens`` the pieces before and after the core (norms, projections,
        rotary, SwiGLU: all per token) run over sequence tiles in forward and again, tile by
        tile, in backward (activations.tiled): they keep only their inputs, so no (T, hidden)
        intermediate of the whole shard is ever alive, and ``keep_attention`` is implied.
        ``values_needed=False`` (a recomputation whose output only its graph is wanted of):
        the tiles after the core are not computed until backward (activations.tiled).
        """
        pre, post = self._compiled or (self._pre_attention, self._post_attention)
        tile = self.mlp_tile_tokens
        if tile and x.shape[1] > tile and torch.is_grad_enabled():
            pre_params, post_params = self._piece_params()
            q, k, v = tiled(pre, (x, cos, sin), pre_params, tile)
            out = self.attention.attend(q, k, v, document_ids)  # (B, T, H, D)
            return tiled(post, (x, out), post_params, tile, values_needed)
        if keep_attention:
            q, k, v = checkpoint(pre, x, cos, sin, use_reentrant=False)
            out = self.attention.attend(q, k, v, document_ids)  # (B, T, H, D)
            return checkpoint(post, x, out, use_reentrant=False)
        q, k, v = pre(x, cos, sin)
        return post(x, self.attention.attend(q, k, v, document_ids))


def _accepts(core: nn.Module, name: str) -> bool:
    """Does ``core(...)`` take a keyword ``name`` (or **kwargs)?"""
    try:
        params = inspect.signature(core.forward if isinstance(core, nn.Module) else core).parameters.values()
    except (TypeError, ValueError):
        return True  # unknown: let the call say
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _default_attention_factory(layer_idx: int) -> nn.Module:
    from ring_lightning.attention import create_ring_attention

    return create_ring_attention("standard")


class LongDocTransformer(nn.Module):
    """Decoder-only LM: embeddings -> n_layers Blocks -> RMSNorm -> LM head.

    Args:
        config: a ModelConfig (or a mapping of its fields, or ``{"preset": name, ...}``).
        attention_factory: ``layer_idx -> nn.Module`` building each layer's attention core,
            called as ``core(q, k, v, is_causal=True, already_split=True[, document_ids=ids])`` with q (B,T,H,D),
            k/v (B,T,K,D), returning (B,T,H,D). Default: ``create_ring_attention("standard")``.
    """

    def __init__(
        self,
        config: Union[ModelConfig, dict],
        attention_factory: Optional[Callable[[int], nn.Module]] = None,
    ):
        super().__init__()
        self.config = config = ModelConfig.from_any(config)
        factory = attention_factory or _default_attention_factory
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, factory(i)) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Pinned host buffers for offloaded activations, reused every step (activations.py).
        self._offload = HostOffload() if config.offload_activations else None
        # With offload, a recomputed block also keeps only its attention core's inputs and
        # outputs and recomputes the rest again in its own backward (as "selective" does):
        # the peak of one block's recompute drops by about half at a few percent of compute.
        self._recompute_keeps_attention = config.offload_activations
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
            elif p.dim() >= 2 and ".core." not in name:
                nn.init.normal_(p, mean=0.0, std=std)

    def _checkpointed(self, layer_idx: int) -> bool:
        mode = self.config.checkpointing
        return mode == "full" or (mode == "selective" and layer_idx % self.config.checkpoint_every_n_layers == 0)

    def _run_blocks(self, h, cos, sin, document_ids):
        """The residual stream through every block, checkpointed as the config says."""
        c = self.config
        if c.checkpointing != "full" or not torch.is_grad_enabled():
            for i, layer in enumerate(self.layers):
                if self._checkpointed(i) and torch.is_grad_enabled():  # selective
                    h = layer(h, cos, sin, keep_attention=True, document_ids=document_ids)
                else:
                    h = layer(h, cos, sin, document_ids=document_ids)
            return h
        offload = self._offload.new_pass() if self._offload is not None else None
        k = c.blocks_per_checkpoint
        for first in range(0, c.n_layers, k):
            group = self.layers[first:first + k]

            def run(x, group=group, values_needed=True):
                recompute = torch.is_grad_enabled()  # in backward: this group's recomputation
                for i, layer in enumerate(group):
                    keep = self._recompute_keeps_attention and recompute
                    # the group's output feeds nothing in its own recomputation: only its graph
                    needed = values_needed or i < len(group) - 1
                    if recompute and len(group) > 1:
                        # Two levels: the group's recomputation keeps only each block's input
                        # and each block is recomputed once more in its own backward, so k
                        # blocks per group cost k inputs on the device, not k blocks' tensors.
                        x = checkpoint(layer, x, cos, sin, keep_attention=keep, document_ids=document_ids,
                                       values_needed=needed, use_reentrant=False)
                    else:
                        x = layer(x, cos, sin, keep_attention=keep, document_ids=document_ids, values_needed=needed)
                return x

            if offload is not None:
                params = [p for layer in group for p in layer.parameters() if p.requires_grad]
                h = recompute_offloaded(run, h, params, offload,
                                        run_for_graph=functools.partial(run, values_needed=False))
            else:
                # Non-reentrant: works with ring autograd Functions and keeps the RNG state.
                h = checkpoint(run, h, use_reentrant=False)
        return h

    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      document_ids: Optional[torch.Tensor] = None, final_norm: bool = True) -> torch.Tensor:
        """The final normed hidden states (B, T, C), what the LM head reads (see ``forward``).

        With ``ring_lightning.models.loss.linear_cross_entropy(h, model.output.weight, labels)`` the
        loss never holds the (B, T, V) logits; with ``final_norm=False`` and
        ``pre_head=model.norm`` there the final norm runs per chunk too (docs/MEMORY.md).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        if tuple(position_ids.shape) not in ((B, T), (T,)):
            raise ValueError(f"position_ids must have shape (B, T)={(B, T)} or (T,), got {tuple(position_ids.shape)}")
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, T)  # (T,) -> (B, T)
        cos, sin = self.rope(position_ids)  # (B, T, 1, D/2) each, shared by every layer
        h = self.tok_embeddings(input_ids)  # (B, T, C)
        h = self._run_blocks(h, cos, sin, document_ids)  # (B, T, C)
        return self.norm(h) if final_norm else h

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for the tokens this device holds.

        Args:
            input_ids: (B, T) token ids.
            position_ids: (B, T) or (T,) GLOBAL positions of those tokens; default arange(T).
            document_ids: (B, T) packed documents: a token attends only within its document.

        Returns:
            logits (B, T, V).

        Raises:
            ValueError: position_ids whose shape does not match input_ids.
        """
        return self.output(self.hidden_states(input_ids, position_ids, document_ids))  # (B, T, V)

    def compile_blocks(self, **compile_kwargs) -> None:
        """Compile each block's work around its attention core (see ``Block.compile_pieces``)."""
        for layer in self.layers:
            layer.compile_pieces(**compile_kwargs)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters; ``exclude_embedding`` drops the token table (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int, causal: bool = True, attention_fraction: float = 1.0) -> float:
        """Training FLOPs (forward + backward) per token, for MFU.

        ``6 * N`` for the matmuls (N = parameters without the embedding table) plus the
        attention scores and weighted sum, counted by ``ring_lightning.models.flops`` as model
        FLOPs (backward = 2 x forward, no recompute; PaLM appendix B): ``12 * n_layers *
        H * D * seq_len`` for dense attention, halved when causal, times
        ``attention_fraction`` for sparse or dilated patterns.

        Args:
            seq_len: GLOBAL sequence length (keys a query can see), not the local shard.
            causal: count only the causal half of the score matrix.
            attention_fraction: fraction of the (causal) score matrix actually computed,
                e.g. ``ring_lightning.models.flops.attention_fraction``.

        Returns:
            FLOPs per token.
        """
        c = self.config
        # pairs of the whole sequence / its tokens = pairs one query token has
        pairs_per_token = attention_pairs(seq_len, c.n_heads, causal=causal) / seq_len * attention_fraction
        attn = c.n_layers * flops_from_pairs(pairs_per_token, c.head_dim, recompute=False)
        return 6 * self.num_params(exclude_embedding=True) + attn
