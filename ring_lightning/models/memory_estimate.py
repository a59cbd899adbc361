"""Device and host memory of one training step, per rank, from the config alone (docs/MEMORY.md).

The pre-flight (preflight.check_memory) refuses a configuration whose estimate exceeds the
GPU or the host before anything starts, and names an override that fits. Every term is a
function of the model's shapes (dim C, n_layers L, heads H, kv heads K, head_dim D,
hidden_dim F, vocabulary V), the tokens each rank holds (T = seq_len / sp, times the batch),
the activation precision and the memory options:

* model state: fp32 weights, gradients and AdamW's two moments (16 bytes/param), DDP's
  gradient buckets, the bf16 weight copies autocast keeps during a forward; under FSDP2
  (``strategy=ring_fsdp``) the 16 bytes/param divided by the ranks sharing it, on the device or,
  with ``offload_params``, on the host, plus the units gathered at a time (the root's, the block
  in use and the next);
* kept activations: what the checkpointing mode keeps per layer until backward;
* the transient peak: one recomputed block (group) in backward, or the logits at the loss,
  whichever is larger (they are never alive together);
* host: with ``offload_activations`` each rank keeps ceil(L / blocks_per_checkpoint) block
  inputs (4 bytes x C per token) in pinned host memory, and the ranks of a node share one host.

The constants are bytes, in the one table below, so a GPU measurement re-fits them in one
place; ``fit_*`` are the measured/derived ratios (1.0: the derivation as written).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

GiB = 2**30

BYTES: Dict[str, float] = {
    # -- model state, per parameter
    "model_state_per_param": 16,      # fp32 weight 4 + gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4
    # the same on the host (strategy.offload_params): fitted to recipes/fsdp_3b_offload_1gpu on one
    # H200, 80.3 GiB peak RSS for 3.61B parameters less the process's 4 GiB (16 derived; the pinned
    # shards and gradients come from the caching host allocator, which rounds blocks up to powers of
    # two, and AdamW's foreach step makes whole-model temporaries on the host)
    "offloaded_state_per_param": 22.7,
    "ddp_buckets_per_param": 4,       # DDP's flat gradient buckets: a second fp32 copy of the gradients
    "autocast_weights_per_param": 2,  # bf16 copies of the weights autocast caches for one forward
    # -- one block without checkpointing, per token (elem = 2 bytes under bf16/fp16 autocast, 4 in fp32)
    "norm_fp32_per_dim": 8,           # one RMSNorm keeps its float32 input and normalised output (2 per block)
    "casts_attention_per_dim": 3,     # x elem: the normed input cast for wq, wk, wv
    "casts_mlp_per_dim": 2,           # x elem: the normed input cast for w1, w3
    "rotary_fp32_per_head_dim": 4,    # rotary's float32 halves of q (H) and k (K): 4 x (H + K) x D
    "core_per_head_dim": 1,           # x elem: q and out (H heads), k and v (K heads): (2H + 2K) x D
    "lse_fp32_per_head": 4,           # the core's float32 log-sum-exp per query head
    "swiglu_per_hidden": 4,           # x elem: w1 out, w3 out, silu, their product (the MLP's bulk)
    "block_input_fp32_per_dim": 4,    # a checkpointed block's (group's) input: the float32 residual stream
    # (under FSDP2 with bf16 gathered weights the residual stream is the bf16 embedding's: 2 bytes)
    # ring / dilated patterns: float32 (out, dq, dk, dv) accumulators and the dilated copies of one
    # block; fitted (4 derived) on one H200 to recipes/longest_bytes_1gpu: 106.5 GiB allocated at
    # 2M tokens against 108 estimated (benchmarks/results/2026-12-02-h200x1-reach/); 10.5 before
    # the ring's large tasks ran in segment groups (recipes/longest_1gpu: 75.4 GiB at 1M tokens)
    "merge_fp32_per_head_dim": 7.5,
    # the same without segment groups (ring.py groups only the standard path's plain tasks: not
    # hilbert, block_sparse, other declared masks or dropout): recipes/longest_1gpu, 75.4 GiB at 1M
    "merge_fp32_ungrouped_per_head_dim": 10.5,
    "ring_kv_buffers_per_head_dim": 4,  # x elem: k, v in flight around the ring (2 buffers x (k, v)) x K x D
    # -- the loss, per token
    "logits_per_vocab": 14,           # plain head: bf16 logits 2 + fp32 copy 4 + log-softmax 4 + gradient 4
    "chunk_logits_per_vocab": 10,     # chunked loss, per token of ONE chunk: fp32 logits 4 + bf16 grad 2 + slack
    "chunked_grad_hidden_per_dim": 4,  # chunked loss: d loss / d hidden (float32), kept from forward to backward
    "head_input_per_dim": 1,          # x elem: the final norm's output cast for the plain head
    # -- per token, whatever the options
    "inputs_per_token": 32,           # input_ids, labels, position_ids, document_ids (int64)
    "rope_fp32_per_head_dim": 4,      # cos and sin, (B, T, 1, D/2) float32 each
    # -- fixed
    "cuda_context": 1.5 * GiB,        # per GPU: CUDA context, cuBLAS/cuDNN workspaces, allocator slack
    "host_process_gpu": 4 * GiB,      # per rank on the host: Python, torch, the CUDA libraries, the data
    "host_process_cpu": 1 * GiB,      # the same without CUDA
    # -- fitted multipliers (1.0 = the derivation above; re-fit against GPU measurements)
    "fit_activations": 1.0,
    "fit_logits": 1.0,
}

# The estimate is within about this of a measured peak; the pre-flight refuses only above
# capacity x REFUSE_ABOVE (it never refuses a run that might fit) and warns above WARN_ABOVE.
REFUSE_ABOVE = 1.10
WARN_ABOVE = 0.90

# What `checkpointing=offload` (conf/checkpointing/offload.yaml) sets; a unit test keeps them equal.
OFFLOAD_OPTIONS = {"checkpointing": "full", "offload_activations": True, "blocks_per_checkpoint": 1,
                   "mlp_tile_tokens": 16384}
# linear_cross_entropy's default chunk: 2^30 float32 logits (ring_lightning/models/loss.py).
_CHUNK_ELEMENTS = 2**30


@dataclass
class Shapes:
    """The model fields the estimate reads (a ModelConfig, a Hydra node, or a mapping of them)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    hidden_dim: Optional[int] = None
    checkpointing: str = "none"
    checkpoint_every_n_layers: int = 1
    offload_activations: bool = False
    blocks_per_checkpoint: int = 1
    mlp_tile_tokens: int = 0

    @classmethod
    def from_any(cls, model: Any) -> "Shapes":
        """From a ModelConfig or a mapping of its fields (other keys ignored)."""
        from ring_lightning.models.model_config import ModelConfig

        known = {f.name for f in fields(ModelConfig)}
        data = asdict(model) if isinstance(model, ModelConfig) else dict(model)
        config = ModelConfig(**{k: v for k, v in data.items() if k in known})  # derives hidden_dim, kv heads
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        C = self.dim
        return 2 * self.vocab_size * C + self.n_layers * self.block_params() + C  # untied embedding and head, final norm

    def block_params(self) -> int:
        C, H, K, D, F = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim
        return C * (H * D + 2 * K * D) + H * D * C + 3 * C * F + 2 * C  # q/k/v/o, SwiGLU, two norms


@dataclass
class MemoryEstimate:
    """Bytes per rank by term (``device``: on the GPU, or the host on CPU runs; ``host``: host memory of
    one rank), and how many ranks share a node's host."""

    device: Dict[str, float] = field(default_factory=dict)
    host: Dict[str, float] = field(default_factory=dict)
    ranks_per_node: int = 1
    on_gpu: bool = True
    #: host bytes of one rank at start on GPU runs: the float32 model every rank builds before
    #: moving or sharding it (freed then; under offload_params the "model state" term holds it)
    host_build: float = 0.0

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_build_per_node(self) -> float:
        return self.ranks_per_node * self.host_build

    @property
    def host_per_node(self) -> float:
        return self.ranks_per_node * sum(self.host.values())

    def describe(self, terms: Mapping[str, float]) -> str:
        shown = [f"{name} {value / GiB:.1f}" for name, value in terms.items() if value >= 0.05 * GiB]
        return ", ".join(shown)


def _element_bytes(precision: str) -> int:
    """Bytes of an activation element: autocast (bf16/fp16 mixed) keeps 2, fp32 4, fp64 8."""
    text = str(precision)
    if "64" in text:
        return 8
    return 2 if ("16" in text or "bf16" in text) else 4


def estimate_memory(model: Any, seq_len: int, batch_size: int = 1, sp: int = 1, ulysses: int = 1,
                    precision: str = "bf16-mixed", loss_chunk_tokens: Optional[int] = None,
                    merged_attention: bool = False, on_gpu: bool = True, ranks_per_node: int = 1,
                    segment_groups: bool = True, shard_ranks: int = 0, offload_params: bool = False,
                    gathered_param_bytes: int = 4) -> MemoryEstimate:
    """Peak memory of one training step (forward, backward, AdamW) of one rank.

    Args:
        model: a ModelConfig or a mapping of its fields (dim, n_layers, n_heads, vocab_size,
            checkpointing, the memory options).
        seq_len: the GLOBAL sequence length; each rank holds seq_len / sp tokens of each sample.
        batch_size: samples per rank.
        sp: sequence-parallel size; ulysses: the all-to-all part of it (the ring runs over sp / ulysses).
        precision: the trainer's precision (``bf16-mixed``: 2-byte activations, bf16 weight copies).
        loss_chunk_tokens: ``module.loss_chunk_tokens``: None = linear_cross_entropy's default chunk,
            0 = the plain head (the (T, V) logits), n = chunks of n tokens.
        merged_attention: the core merges partial results in float32 (a dilated pattern, or a ring).
        segment_groups: the ring computes large tasks in groups of segments (attention/ring.py:
            the standard and distributed variants without dropout); False: whole-shard transients.
        on_gpu: False puts every device term on the host (CPU runs).
        ranks_per_node: processes sharing one host.
        shard_ranks: 0: the model is replicated (DDP, ``strategy=ring``); n: FSDP2 shards it over n
            ranks (``strategy=ring_fsdp``: the whole world).
        offload_params: FSDP2 keeps the shards, gradients and optimizer state on the host.
        gathered_param_bytes: bytes of a gathered weight under FSDP2 (2 with ``mixed_precision`` bf16).

    Returns:
        A MemoryEstimate with every term named (docs/MEMORY.md).
    """
    s = Shapes.from_any(model)
    b = BYTES
    elem = _element_bytes(precision)
    mixed = elem == 2 and "64" not in str(precision) and "true" not in str(precision)
    C, L, H, K, D, F, V = s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.hidden_dim, s.vocab_size
    tokens = batch_size * math.ceil(seq_len / sp)  # this rank's tokens
    P = s.num_params()

    # One block without checkpointing, per token: the attention half and the MLP half.
    core = elem * b["core_per_head_dim"] * (2 * H + 2 * K) * D + b["lse_fp32_per_head"] * H
    attention_half = (b["norm_fp32_per_dim"] * C + elem * b["casts_attention_per_dim"] * C
                      + b["rotary_fp32_per_head_dim"] * (H + K) * D + core)
    mlp_half = b["norm_fp32_per_dim"] * C + elem * b["casts_mlp_per_dim"] * C + elem * b["swiglu_per_hidden"] * F
    block = attention_half + mlp_half
    bf16_residual = shard_ranks > 0 and gathered_param_bytes == 2  # fsdp.shard_model: blocks take it uncast
    block_input = (2 if bf16_residual else b["block_input_fp32_per_dim"]) * C
    pieces = block - core  # what the pieces around a core keep: norms, casts, rotary, SwiGLU
    kept_core = block_input + core  # a block whose pieces are recomputed keeps its input and its core's
    # mlp_tile_tokens: the pieces run over tiles and keep only their inputs (model.Block.forward), so
    # every block keeps input + core, and one tile's pieces are a constant.
    tiles = s.mlp_tile_tokens > 0 and tokens // batch_size > s.mlp_tile_tokens
    per_block, pieces_recomputed = (kept_core, 0.0) if tiles else (block, pieces)
    tile_bytes = batch_size * s.mlp_tile_tokens * pieces if tiles else 0.0
    extra = 0.0  # the core's own float32 work in the one block being computed
    if merged_attention:
        merge = b["merge_fp32_per_head_dim" if segment_groups else "merge_fp32_ungrouped_per_head_dim"]
        extra += merge * (H + 2 * K) * D
    if sp // max(1, ulysses) > 1:
        extra += elem * b["ring_kv_buffers_per_head_dim"] * K * D

    # Kept until backward (per token), and the largest transient of backward (per token).
    if s.checkpointing == "none":
        kept, recompute = L * per_block, extra
    elif s.checkpointing == "selective":
        n = math.ceil(L / s.checkpoint_every_n_layers)
        kept = n * kept_core + (L - n) * per_block
        recompute = pieces_recomputed + extra  # the pieces around one core
    else:  # full: one saved input per group of k blocks; backward recomputes one group
        k = s.blocks_per_checkpoint
        # k > 1: the group's recomputation checkpoints each block again (model._run_blocks), so
        # it holds k block inputs and one block's tensors at a time
        group_inputs = k * block_input if k > 1 else 0.0
        if s.offload_activations:  # inputs on the host; on the device the group in use and the next
            kept = 2 * block_input
            # a recomputed block keeps its core (as selective) and recomputes its pieces again
            recompute = group_inputs + kept_core + pieces_recomputed + extra
        else:
            kept = math.ceil(L / k) * block_input
            recompute = group_inputs + per_block + extra
    kept += b["inputs_per_token"] + b["rope_fp32_per_head_dim"] * D

    # The loss: the plain head holds (T, V) logits; the chunked one a gradient of the hidden states
    # per token and one chunk's logits (a constant).
    if loss_chunk_tokens == 0:  # the final norm's float32 tensors too; the chunked loss runs it per chunk
        kept += elem * b["head_input_per_dim"] * C + b["norm_fp32_per_dim"] * C
        loss_peak = tokens * b["logits_per_vocab"] * V * b["fit_logits"]
        loss_fixed = 0.0
    else:
        chunk = loss_chunk_tokens or max(256, _CHUNK_ELEMENTS // V)
        kept += b["chunked_grad_hidden_per_dim"] * C
        loss_peak = min(chunk, tokens) * b["chunk_logits_per_vocab"] * V * b["fit_logits"]
        loss_fixed = 4 * V * C + elem * V * C  # the head's float32 gradient, accumulated; its cast weight

    fit = b["fit_activations"]
    state, host_state = _model_state(s, P, mixed, shard_ranks, offload_params, gathered_param_bytes)
    device = {
        **state,
        "kept activations": tokens * kept * fit,
        "backward peak": max(loss_peak, (tokens * recompute + tile_bytes) * fit) + loss_fixed,
    }
    host = dict(host_state)
    if s.checkpointing == "full" and s.offload_activations:
        host["offloaded inputs"] = tokens * math.ceil(L / s.blocks_per_checkpoint) * block_input
    build = 0.0
    if on_gpu:
        device["CUDA context"] = b["cuda_context"]
        host["process"] = b["host_process_gpu"]
        build = 0.0 if offload_params else 4 * P
    else:  # a CPU run: everything is host memory
        host = {**device, **host, "process": b["host_process_cpu"]}
        device = {}
    return MemoryEstimate(device=device, host=host, ranks_per_node=ranks_per_node, on_gpu=on_gpu,
                          host_build=build)


def _model_state(s: Shapes, P: int, mixed: bool, shard_ranks: int, offload_params: bool,
                 gathered_param_bytes: int) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(device terms, host terms) of the model state: replicated under DDP; under FSDP2 sharded
    over ``shard_ranks`` (on the host with ``offload_params``) plus the units gathered at once."""
    b = BYTES
    if not shard_ranks:
        return {"model state": b["model_state_per_param"] * P, "DDP buckets": b["ddp_buckets_per_param"] * P,
                "autocast weights": b["autocast_weights_per_param"] * P if mixed else 0.0}, {}
    block = s.block_params()
    root = P - s.n_layers * block  # embedding, head, final norm: gathered for the whole step
    # and the block in use with the next one (prefetched); a recomputed group of k blocks keeps its
    # k blocks gathered until each block's backward has run
    k = s.blocks_per_checkpoint if s.checkpointing == "full" else 1
    gathered = root + (k + 1) * block
    # each gathered weight and its gradient in the gathered dtype, the float32 reduce-scatter input
    # of one block, autocast's bf16 copies when the gathered weights are float32
    unit_bytes = 2 * gathered_param_bytes * gathered + 4 * block
    if mixed and gathered_param_bytes == 4:
        unit_bytes += b["autocast_weights_per_param"] * gathered
    if offload_params:
        unit_bytes += 4 * block  # the float32 shard copied to the device before its all-gather
    sharded = b["model_state_per_param"] * P / shard_ranks
    # each rank builds the whole float32 model on the host before it is sharded
    offloaded = b["offloaded_state_per_param"] * P / shard_ranks
    host = {"model state": max(offloaded, 4 * P * (1 + 1 / shard_ranks))} if offload_params else {}
    device = {"gathered weights": unit_bytes}
    if not offload_params:
        device["model state (sharded)"] = sharded
    return device, host
