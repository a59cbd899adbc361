"""The memory estimate of one step (ring_lightning/models/memory_estimate.py, docs/MEMORY.md) against the
GPU and the host, with the overrides that fit when it does not."""

from __future__ import annotations

import math
import os
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from ring_lightning.parallel.fsdp import gathers_bf16
from ring_lightning.preflight import machine
from ring_lightning.preflight.errors import ConfigError
from ring_lightning.preflight.shape import attention_rules, parallel_dims
from ring_lightning.sequence.dims import ParallelDims


def _memory_inputs(cfg: DictConfig, per_node: int, dims: Optional[ParallelDims] = None) -> Optional[dict]:
    """The arguments of memory_estimate.estimate_memory for this config; None when the model is not
    described by ModelConfig fields (a Hugging Face or user model: nothing to estimate from)."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig) or not all(k in model for k in ("dim", "n_layers", "n_heads", "vocab_size")):
        return None
    seq_len, batch = cfg.data.get("seq_len"), cfg.data.get("batch_size", 1)
    if not isinstance(seq_len, int) or not isinstance(batch, int):
        return None
    dims = dims or parallel_dims(cfg, per_node)
    sp, ulysses = dims.sp, dims.ulysses
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and machine.visible_gpus() > 0)
    attention = cfg.module.get("attention") or {}
    precision = str(cfg.trainer.get("precision", "32-true"))
    return dict(**_model_state_inputs(cfg, dims, precision), model=OmegaConf.to_container(model, resolve=True), seq_len=seq_len, batch_size=batch, sp=sp,
                ulysses=ulysses, precision=precision,
                loss_chunk_tokens=cfg.module.get("loss_chunk_tokens", None),
                merged_attention=attention.get("segment_lengths") is not None or dims.ring > 1,
                # the ring's segment groups bound the core's transients on the standard path only
                segment_groups=(attention.get("variant", "standard") in ("standard", "distributed")
                                and not attention.get("dropout")),
                on_gpu=on_gpu, ranks_per_node=per_node, dims=dims)


def _model_state_inputs(cfg: DictConfig, dims: ParallelDims, precision: str) -> dict:
    """How the strategy holds the model state: replicated (``strategy=ring``, DDP) or sharded by
    FSDP2 over the whole world (``strategy=ring_fsdp``), on the host with ``offload_params``."""
    strategy = cfg.get("strategy") or {}
    if not str(strategy.get("_target_", "")).endswith("RingFSDPStrategy"):
        return dict(shard_ranks=0, offload_params=False, gathered_param_bytes=4)
    bf16 = gathers_bf16(strategy.get("mixed_precision", "auto"), precision)
    return dict(shard_ranks=dims.world, offload_params=bool(strategy.get("offload_params", False)),
                gathered_param_bytes=2 if bf16 else 4)


def _largest_length_that_fits(cfg: DictConfig, dims: ParallelDims, inputs: dict, fits) -> Optional[int]:
    """The longest valid data.seq_len (ring_lightning.sequence.lengths) below the configured one that fits."""
    try:
        rules = dims.length_rules(*(attention_rules(cfg) or ()))
    except ConfigError:
        rules = dims.length_rules()
    low, high = 0, inputs["seq_len"]  # the largest fitting length, by bisection (memory grows with length)
    while high - low > max(1, low // 1024):
        mid = (low + high) // 2
        low, high = (mid, high) if fits(seq_len=mid) else (low, mid)
    unit = rules.multiple()
    # a round number: four significant bits (e.g. 655360, not 701234), else a power of two
    step = math.lcm(unit, 2 ** max(0, low.bit_length() - 4))
    powers = [2**e for e in range(low.bit_length(), 0, -1) if 2**e <= low]
    candidates = [low // step * step, low // unit * unit, *powers]
    return next((n for n in candidates if n > 0 and not rules.problems(n)), None)


def check_memory(cfg: DictConfig, per_node: int, device_bytes: Optional[int] = None,
                 host_bytes: Optional[int] = None, dims: Optional[ParallelDims] = None) -> List[str]:
    """The memory estimate of one step (ring_lightning/models/memory_estimate.py, docs/MEMORY.md) against
    the GPU (GPU runs) and the host (offloaded activations of every rank of the node; on CPU runs
    everything). Refuses a configuration over capacity (with REFUSE_ABOVE's margin) naming the
    overrides that fit; on GPU runs returns the estimate as a note. ``preflight.check_memory=false``
    skips it. ``device_bytes`` / ``host_bytes``: the capacities (default: this machine's)."""
    from ring_lightning.models import memory_estimate as mem

    if not (cfg.get("preflight") or {}).get("check_memory", True):
        return []
    inputs = _memory_inputs(cfg, per_node, dims)
    if inputs is None:
        return []
    dims = inputs.pop("dims")
    device_cap = device_bytes if device_bytes is not None else (machine.gpu_memory_bytes() if inputs["on_gpu"] else None)
    # The host is measured by a node's first process only (LOCAL_RANK unset or 0), before any of its
    # ranks has built the model: a rank that Lightning's launcher starts re-runs this pre-flight with
    # rank 0's float32 model already on the host, and would refuse, silently (only the launching
    # process prints), a run that rank 0 let through.
    first_of_node = os.environ.get("LOCAL_RANK", "0") in ("", "0")
    host_cap = host_bytes if host_bytes is not None else (machine.host_available_bytes() if first_of_node else None)
    if not inputs["on_gpu"]:
        device_cap = None

    def over(est: "mem.MemoryEstimate", limit: float = mem.REFUSE_ABOVE) -> List[str]:
        where = []
        if device_cap and est.device_total > limit * device_cap:
            where.append("device")
        # the host binds what it holds for the run: offloaded activations, or everything on CPU runs
        # (the per-process share alone is a guess too rough to refuse a GPU run on)
        binding = not est.on_gpu or est.host.get("offloaded inputs", 0) > 0 or est.host.get("model state", 0) > 0
        if host_cap and binding and est.host_per_node > limit * host_cap:
            where.append("host")
        # every rank builds the float32 model on the host at once before it moves or is sharded
        if host_cap and est.host_build_per_node > limit * host_cap:
            where.append("host at start")
        return where

    def fits(**changes) -> bool:
        model = {**inputs["model"], **changes.pop("model", {})}
        return not over(mem.estimate_memory(**{**inputs, "model": model, **changes}))

    est = mem.estimate_memory(**inputs)
    gib = mem.GiB
    host_text = (f"host {est.host_per_node / gib:.1f} GiB for the node's {est.ranks_per_node} rank(s) "
                 f"({est.describe(est.host)} per rank)")
    host_text += f" of {host_cap / gib:.1f} GiB available" if host_cap else ""
    where = over(est)
    if not where:
        if not inputs["on_gpu"]:
            return []
        gpu = f" of {device_cap / gib:.1f} GiB" if device_cap else ""
        warn = " (close to the limit: may not fit)" if over(est, mem.WARN_ABOVE) else ""
        return [f"note: memory estimate per GPU {est.device_total / gib:.1f} GiB{gpu}{warn} "
                f"({est.describe(est.device)}); {host_text} (docs/MEMORY.md)"]

    # What fits: the offload option, more sequence-parallel ranks, a shorter sequence.
    model, fixes = inputs["model"], []
    offloading = model.get("checkpointing") == "full" and model.get("offload_activations")
    if model.get("checkpointing") != "full" and fits(model={"checkpointing": "full"}):
        fixes.append("checkpointing=full")  # no host memory taken: the cheaper fix when it suffices
    elif not offloading and inputs["on_gpu"] and fits(model=mem.OFFLOAD_OPTIONS):
        fixes.append("checkpointing=offload")
    if offloading and "host" in where:
        k = next((k for k in range(model.get("blocks_per_checkpoint", 1) + 1, model["n_layers"] + 1)
                  if fits(model={"blocks_per_checkpoint": k})), None)
        if k:
            fixes.append(f"model.blocks_per_checkpoint={k} (one saved input per {k} blocks)")
    sp = next((inputs["sp"] * 2**e for e in range(1, 11) if fits(sp=inputs["sp"] * 2**e)), None)
    if sp and inputs["on_gpu"]:
        fixes.append(f"strategy.sequence_parallel_size={sp} ({sp} GPUs: trainer.devices / trainer.num_nodes)")
    if not inputs["shard_ranks"] and inputs["on_gpu"] and "device" in where:  # DDP: the model state is sharded
        world, bf16 = dims.world, 2 if gathers_bf16("auto", inputs["precision"]) else 4  # the default policy
        if fits(shard_ranks=world, gathered_param_bytes=bf16) and world > 1:
            fixes.append("strategy=ring_fsdp (the model state sharded over the GPUs)")
        elif fits(shard_ranks=world, gathered_param_bytes=bf16, offload_params=True):
            fixes.append("strategy=ring_fsdp strategy.offload_params=true (the model state in host memory)")
    length = _largest_length_that_fits(cfg, dims, inputs, fits)
    if length:
        fixes.append(f"data.seq_len={length}")
    needs = []
    if "device" in where:
        needs.append(f"about {est.device_total / gib:.1f} GiB per GPU ({est.describe(est.device)}) but the GPU "
                     f"has {device_cap / gib:.1f} GiB")
    if "host" in where:
        needs.append(host_text)
    if "host at start" in where:
        needs.append(f"host {est.host_build_per_node / gib:.1f} GiB at start (each of the node's {est.ranks_per_node} "
                     f"rank(s) builds the float32 model, {est.host_build / gib:.1f} GiB, before moving or sharding "
                     f"it) of {host_cap / gib:.1f} GiB available")
        if where == ["host at start"]:  # no override of this config lowers it
            fixes.append(f"a node with about {(est.host_build_per_node + est.ranks_per_node * est.host['process']) / gib:.0f} "
                         f"GiB of host memory available (no override of this run lowers it)")
    raise ConfigError(
        f"memory: this run needs {' and '.join(needs)}. "
        + (f"It fits with {', or '.join(fixes)}. " if fixes else "No single override fits; lower model size or batch. ")
        + f"The estimate (docs/MEMORY.md) refuses only above {mem.REFUSE_ABOVE:.2f}x the capacity; "
          f"preflight.check_memory=false skips this check")
