"""``attn_implementation="ring_lightning"``: Hugging Face attention layers calling the ring.

transformers looks an attention layer's function up by name in its public ``AttentionInterface``
and calls it as ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)``
with heads-first tensors: query (B, H, T, D), key/value (B, K, T, D) (grouped-query heads not
repeated), and expects ``(out (B, T, H, D), weights or None)`` back. This file registers such a
function (and the matching mask function of ``AttentionMaskInterface``) under the name
:data:`IMPLEMENTATION`; nothing of transformers is patched, so ``from_pretrained(...,
attn_implementation="ring_lightning")``, ``from_config`` and ``set_attn_implementation`` all
reach it, across transformers releases that keep the interface.

Each attention layer computes through a ring attention core (``create_ring_attention``) kept as
its ``ring_attention`` submodule (:func:`attach_ring_attention`; no parameters, so checkpoints and
``save_pretrained`` are unchanged). The core reads the shard context the strategy sets per step
(``ring_lightning.sequence.sharding``): under ``RingStrategy`` each rank holds a shard of the sequence and
the core rings over the sequence group; with no context it is plain single-device attention.

What the ring cannot honour is refused by name, never computed differently (:func:`_refuse`):
a padding ``attention_mask`` with padding in it, an arbitrary 4-D mask, a sliding window shorter
than the sequence, logit softcapping, attention sinks, attention dropout in training, a KV cache
(decoding), ``output_attentions``. Packed documents: ``document_ids`` passed to the model's
forward reach every layer (transformers forwards extra keyword arguments to the attention
function); without them, ``position_ids`` that restart (what transformers' own masks read as
packed sequences) are turned into documents the same way, so sp=1 equals ``sdpa``.

Letters: B batch, H query heads, K kv heads, T local sequence length, N global, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ring_lightning.sequence import sharding
from ring_lightning.attention import RingAttentionBase, RingAttentionConfig, create_ring_attention
from ring_lightning.attention.documents import LastTensorCache
from ring_lightning.constants import HF_ATTN_IMPLEMENTATION
from ring_lightning.parallel import ring_usage

IMPLEMENTATION = HF_ATTN_IMPLEMENTATION
CORE_ATTRIBUTE = "ring_attention"  # the core's name inside each HF attention module
_SINK_KWARGS = ("s_aux", "sinks")  # attention sinks (gpt-oss passes s_aux)


def is_attention_layer(module: nn.Module) -> bool:
    """An HF attention layer of the AttentionInterface kind: it carries ``layer_idx``, ``scaling``
    and the model ``config`` whose ``_attn_implementation`` picks the function."""
    config = getattr(module, "config", None)
    return (hasattr(module, "layer_idx") and hasattr(module, "scaling")
            and hasattr(config, "_attn_implementation") and not hasattr(module, "set_attn_implementation"))


def attach_ring_attention(model: nn.Module, variant: str = "standard",
                          config: Optional[RingAttentionConfig] = None, replace: bool = False, **fields) -> int:
    """Give every attention layer of ``model`` a ring attention core (``module.ring_attention``).

    Args:
        model: a transformers model (or anything containing one).
        variant, config, fields: as for ``create_ring_attention``; the layer's ``scaling`` becomes the
            core's ``scale``.
        replace: replace cores already attached (default: keep them).

    Returns:
        The number of cores attached.
    """
    attached = 0
    for module in model.modules():
        if not is_attention_layer(module) or (getattr(module, CORE_ATTRIBUTE, None) is not None and not replace):
            continue
        core = create_ring_attention(variant, config=config, **fields)
        core.config = dataclasses.replace(core.config, scale=float(module.scaling))
        setattr(module, CORE_ATTRIBUTE, core)  # an nn.Module attribute: a submodule without parameters
        attached += 1
    return attached


def _core(module: nn.Module) -> RingAttentionBase:
    core = getattr(module, CORE_ATTRIBUTE, None)
    if core is None:  # a model built by the user: the default core, once per layer
        attach_ring_attention(module)
        core = getattr(module, CORE_ATTRIBUTE)
    return core


def _sequence_length(local: int) -> int:
    """The global length N of a shard of ``local`` tokens under the active shard context."""
    active = sharding.active_sequence_sharding()
    if active is None or active.group is None:
        return local
    return local * dist.get_world_size(active.group)


def _refuse(module, query, key, attention_mask, dropout, sliding_window, softcap, kwargs) -> None:
    """A ValueError naming the feature the ring would otherwise silently drop."""
    where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if attention_mask is not None:
        raise ValueError(
            f"attn_implementation={IMPLEMENTATION!r}: {where} got an explicit attention mask of shape "
            f"{tuple(attention_mask.shape)}; the ring computes causal attention, optionally within packed "
            f"documents (pass document_ids= to the model's forward), and cannot apply an arbitrary mask. "
            f"Drop the mask, or use attn_implementation='sdpa' on one device")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"attn_implementation={IMPLEMENTATION!r}: {where} got {query.shape[2]} queries against {key.shape[2]} "
            f"keys (a KV cache, i.e. generation): the ring attends a sequence to itself. Generate with "
            f"model.set_attn_implementation('sdpa') and use_cache as usual")
    if getattr(getattr(module, "config", None), "is_causal", True) is False:
        raise ValueError(f"attn_implementation={IMPLEMENTATION!r}: {where}'s config sets is_causal=False "
                         f"(bidirectional attention), which this implementation does not compute; leave it causal")
    if dropout:
        raise ValueError(
            f"attn_implementation={IMPLEMENTATION!r}: {where} asks for attention dropout {dropout} in training, "
            f"which this implementation does not apply; set the model config's attention_dropout=0.0")
    if softcap is not None:
        raise ValueError(f"attn_implementation={IMPLEMENTATION!r}: {where} uses logit softcapping (softcap={softcap}), "
                         f"which the ring does not apply; this model family is not supported")
    sinks = [k for k in _SINK_KWARGS if kwargs.get(k) is not None]
    if sinks or kwargs.get("position_bias") is not None:
        feature = "attention sinks" if sinks else "a position bias"
        raise ValueError(f"attn_implementation={IMPLEMENTATION!r}: {where} uses {feature}, which the ring does "
                         f"not apply; this model family is not supported")
    if kwargs.get("output_attentions"):
        raise ValueError(f"attn_implementation={IMPLEMENTATION!r} never forms attention weights; call the model "
                         f"with output_attentions=False (or use attn_implementation='eager' to inspect them)")
    if sliding_window is not None:
        n = _sequence_length(query.shape[2])
        if n > sliding_window:
            raise ValueError(
                f"attn_implementation={IMPLEMENTATION!r}: {where} has a sliding window of {sliding_window} tokens, "
                f"shorter than the sequence ({n} tokens); the ring attends over the whole causal context. Set the "
                f"model config's sliding_window=None (Mistral) or use_sliding_window=False (Qwen2/Qwen3), or train "
                f"on sequences of at most {sliding_window} tokens")


_positions_cache = LastTensorCache()


def _documents_from_positions(position_ids: torch.Tensor, batch: int, local: int) -> Optional[torch.Tensor]:
    """Documents read from positions that restart, as transformers' own masks read them: a run
    of consecutive positions is one sequence. The key ``global index - position`` is the same for
    every token of a run on every rank (so it works on shards), and one value when nothing restarts
    (then None: plain causal attention). Computed once per step (the layers share the tensor)."""
    active = sharding.active_sequence_sharding()
    group = None if active is None else active.group
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    layout = "contiguous" if active is None else active.layout
    cache_key = (batch, local, world, rank, layout)
    hit = _positions_cache.get(position_ids, cache_key)
    if hit is not None:
        return hit[0]
    pos_BT = position_ids.expand(batch, -1) if position_ids.shape[0] == 1 else position_ids
    index_T = sharding.sequence_positions(local * world, world, rank, layout, device=pos_BT.device)
    key_BT = index_T.unsqueeze(0) - pos_BT  # constant along a run of consecutive positions
    # 0 everywhere when positions are the global ones. Every rank must agree on documents or none
    # (the ring's calls must match), so a restart on any rank counts: one flag over the group.
    # Local positions (arange of the shard: the model's default when none are passed) would rotate
    # every shard as if it began the sequence: refused on every rank alike.
    local_T = torch.arange(local, device=pos_BT.device)
    # flags: [positions are 0..T-1 on this rank, some position restarts on this rank]
    flags = torch.tensor([int(bool((pos_BT == local_T).all())), int(bool((key_BT != 0).any()))],
                         device=pos_BT.device)
    if group is not None:
        flags = flags.cpu() if dist.get_backend(group) == "gloo" else flags
        dist.all_reduce(flags, group=group)  # sums over the sequence group
    code = 2 if world > 1 and int(flags[0]) == world else int(int(flags[1]) > 0)
    if int(code) == 2:
        raise ValueError(
            f"attn_implementation={IMPLEMENTATION!r} under sequence parallelism got shard-local position_ids "
            f"(0..{local - 1} on every rank): pass the GLOBAL positions the strategy adds to each batch, "
            f"model(input_ids, position_ids=batch['position_ids'], ...)")
    documents = key_BT if int(code) == 1 else None
    _positions_cache.put(position_ids, cache_key, (documents,))
    return documents


def ring_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                           softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                           **kwargs: Any):
    """The AttentionInterface function: (B, H, T, D) query, (B, K, T, D) key/value -> ((B, T, H, D), None)."""
    _refuse(module, query, key, attention_mask, dropout, sliding_window, softcap, kwargs)
    core = _core(module)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if core.config.scale != scale:  # the layer's own scaling (e.g. a query_pre_attn_scalar)
        core.config = dataclasses.replace(core.config, scale=scale)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    documents = kwargs.get("document_ids")
    # transformers reads restarting positions as packed sequences only without a cache (training)
    if documents is None and not kwargs.get("use_cache") and isinstance(kwargs.get("position_ids"), torch.Tensor) \
            and kwargs["position_ids"].dim() == 2:
        documents = _documents_from_positions(kwargs["position_ids"], query.shape[0], query.shape[2])
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # What sdpa does under autocast: the rotary embeddings leave q and k in float32 (float32
        # cos/sin) while v is in the autocast dtype; the kernels take one dtype.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    out_BHTD = core(query, key, value, is_causal=causal, already_split=True, document_ids=documents,
                    qkv_layout="bhtd")
    return out_BHTD.transpose(1, 2), None  # (B, T, H, D), as every AttentionInterface function returns


def ring_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        mask_function: Any = None, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
    """The AttentionMaskInterface function: no mask tensor (the ring is causal by itself, documents come
    as ids); a 2-D padding mask that pads anything is refused rather than ignored.

    transformers calls it once per forward with the user's 2-D ``attention_mask`` (booleans).
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"attn_implementation={IMPLEMENTATION!r} cannot apply a padding attention_mask (this batch pads "
            f"{int((~attention_mask.bool()).sum())} positions). Pack documents instead of padding them (pass "
            f"document_ids= to the model's forward; ring_lightning's data module does), or drop attention_mask "
            f"when it has no padding")
    return None


def register() -> None:
    """Register :data:`IMPLEMENTATION` with transformers, and :func:`attach_ring_attention` with the
    strategy's ring-usage checks (done on ``import ring_lightning.hf``)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, ring_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ring_attention_mask)
    ring_usage.register_hf_attacher(attach_ring_attention)  # the strategy attaches cores through it
