"""Pre-flight: the composed Hydra config checked before any process, process group or logger starts.

``train.py`` calls these between composing the config and ``trainer.fit``. A user error found
here is printed once, by the launching process, as one message naming the override to change
and a value that works (``data.seq_len=8192``), and every process exits with status 2 without
a traceback (``HYDRA_FULL_ERROR=1`` shows one). What is checked:

* devices: an accelerator that exists here, no more GPUs than are visible;
* the parallel shape (``ParallelDims``, ring_lightning/sequence/dims.py: the strategy's own checks);
* the sequence length against everything that constrains it (``ring_lightning.lengths``:
  ranks and layout, segments, dilations, block size);
* memory: the estimate of one step (``memory_estimate.py``, docs/MEMORY.md) against the GPU
  and the host; a configuration that cannot fit is refused with the overrides that fit
  (``preflight.check_memory=false`` skips it);
* the vocabulary: an explicit ``model.vocab_size`` below the tokenizer's ids;
* the data source (``data=hub``: the hub is asked once, unless the windows are cached;
  ``data=files``: binary files and hidden entries named, an empty or too-short corpus refused);
* the schedule: a validation interval past ``trainer.max_steps`` is clamped to it, so a run
  shortened on the command line still validates (a note says so);
* a mandatory value left unset (``???``, e.g. ``data.paths`` of ``data=files``): its override;
* more CPU processes than cores: a note (they run, sharing the cores).

Constructor errors (``ValueError`` from the data module, the LM, the strategy) are user errors
too; :func:`user_errors` prefixes the field they name with its config group (``data.batch_size``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ring_lightning.sequence.dims import ParallelDims

EXIT_CONFIG_ERROR = 2
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")  # torchrun, SLURM, Lightning's own launcher


class ConfigError(ValueError):
    """The composed config cannot run; the message names the override to change."""


def is_launching_process() -> bool:
    """True in the process a user started (or rank 0 when a launcher started every rank)."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "0") not in ("", "0"):
            return False
    return True


# ---------------------------------------------------------------------- user errors
def _with_group(message: str, groups: Sequence[Tuple[str, Any]]) -> str:
    """``batch_size must be ...`` -> ``data.batch_size must be ...``: the override to type."""
    for prefix, group in (("ModelConfig.", "model."), ("attention.", "variant."),
                          ("RingAttentionConfig.", "variant."), ("callbacks.", "callbacks.")):
        if message.startswith(prefix):
            return group + message[len(prefix):]
    word = re.match(r"[A-Za-z_][A-Za-z_0-9]*", message)
    for group, node in groups:
        if word and isinstance(node, DictConfig) and word.group(0) in node:
            return f"{group}.{message}"
    return message


@contextmanager
def user_errors(cfg: DictConfig, group: Optional[str] = None) -> Iterator[None]:
    """Turn a ValueError/TypeError raised inside (directly or through Hydra's instantiate) into
    one printed message and ``sys.exit(2)``; ``group`` names the config group being built."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - filtered below, everything else re-raised
        cause = exc
        while type(cause).__name__ == "InstantiationException" and cause.__cause__ is not None:
            cause = cause.__cause__  # hydra wraps the constructor's own error
        if isinstance(cause, MissingMandatoryValue) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            fail(missing_value_message(str(getattr(cause, "full_key", "") or "")))
        if not isinstance(cause, (ValueError, TypeError, ConnectionError)) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(cause, ConfigError):
            fail(str(cause))  # names its override already
        groups = [(g, cfg.get(g)) for g in ([group] if group else []) + ["variant", "model", "module", "data",
                                                                          "strategy", "trainer"]]
        fail(_with_group(str(cause), groups))


# A value that works for the mandatory fields of conf/ (``???`` there), for the message
_MISSING_EXAMPLES = {"data.paths": "\"data.paths=['docs/**/*.md','~/books']\" (files, directories or quoted globs)"}


def missing_value_message(key: str) -> str:
    """``???`` left in the composed config: which override sets it, with an example."""
    example = _MISSING_EXAMPLES.get(key, f"{key}=<value>")
    return f"{key} is required and not set (??? in the config); add {example} to the command"


def fail(message: str) -> None:
    """Print ``message`` once (launching process only) and exit every process with status 2."""
    if is_launching_process():
        print(f"\nring_lightning: this configuration cannot run; nothing was started.\n  {message}\n"
              f"(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)


# ---------------------------------------------------------------------- the checks
def _visible_gpus() -> int:
    from lightning.pytorch.accelerators import CUDAAccelerator

    return CUDAAccelerator.auto_device_count() if CUDAAccelerator.is_available() else 0


def devices_per_node(trainer: DictConfig) -> int:
    """Processes Lightning starts on one node for ``trainer.accelerator`` / ``trainer.devices``."""
    accelerator, devices = str(trainer.get("accelerator", "auto")), trainer.get("devices", "auto")
    gpus = _visible_gpus()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is visible here; "
                          f"run on CPU with trainer=cpu (2 processes) or trainer.accelerator=cpu")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        return gpus if on_gpu else 1
    count = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else devices
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"trainer.devices={devices!r} is not valid; valid values: a number >= 1, a list of "
                          f"device indices, or auto")
    if on_gpu and count > gpus:
        raise ConfigError(f"trainer.devices={devices} but {gpus} CUDA device(s) are visible; set "
                          f"trainer.devices={gpus} (or auto)")
    return count


def parallel_dims(cfg: DictConfig, per_node: int) -> ParallelDims:
    """The parallel shape the strategy will build (ring_lightning/sequence/dims.py), from the
    composed config: ``sp="auto"`` resolved there, every field validated there; a strategy that
    splits nothing is sp=1. ``model.n_heads`` is checked against ``strategy.ulysses_size`` too."""
    strategy = cfg.get("strategy") or {}
    world = per_node * int(cfg.trainer.get("num_nodes", 1) or 1)
    if not str(strategy.get("_target_", "")).endswith("RingStrategy"):
        return ParallelDims(world, 1)
    sp, layout = strategy.get("sequence_parallel_size", "auto"), str(strategy.get("layout", "auto"))
    if sp != "auto" and (not isinstance(sp, int) or isinstance(sp, bool) or sp < 1):
        return ParallelDims(world, 1, layout=layout)  # the strategy names a malformed value itself
    try:
        dims = ParallelDims.resolve(world, per_node, sp, strategy.get("ulysses_size", 1), layout)
        heads = (cfg.get("model") or {}).get("n_heads")
        if isinstance(heads, int):
            dims.check_heads(heads)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return dims


def _attention_rules(cfg: DictConfig):
    """(the attention's length rules as a function of (ring ranks, layout), its layout), from
    ``module.attention``; None for a module without one (a user's own module)."""
    from functools import partial

    from ring_lightning.attention.config import RingAttentionConfig

    node = cfg.module.get("attention")  # None for a module of the user's own (examples/conf/module/own_lm.yaml)
    attention = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    if not isinstance(attention, dict):
        return None
    variant = attention.pop("variant", "standard")
    try:
        config = RingAttentionConfig(**attention)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_with_group(str(exc), [("variant", cfg.get("variant"))])) from exc
    return partial(config.length_rules, variant=variant), config.layout


def check_sequence_length(cfg: DictConfig, per_node: int) -> None:
    """``data.seq_len`` against every rule of the attention under the parallel shape, as one message."""
    seq_len = cfg.data.get("seq_len")
    attention = _attention_rules(cfg)
    if not isinstance(seq_len, int) or attention is None:
        return  # the data module / LM report a malformed value themselves
    dims = parallel_dims(cfg, per_node)
    message = dims.length_error(seq_len, *attention, override="data.seq_len")
    if message is None:
        return
    rules = dims.length_rules(*attention)
    if rules.block_size and seq_len % rules.block_size:
        message += f"; or variant.block_size={math.gcd(seq_len, rules.block_size)}"
    raise ConfigError(message)


def clamp_schedule(cfg: DictConfig) -> List[str]:
    """A validation interval past ``trainer.max_steps`` becomes ``max_steps`` (so a shortened run
    validates, at its end); returns the notes to print."""
    trainer = cfg.trainer
    interval, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    if isinstance(interval, int) and isinstance(max_steps, int) and 0 < max_steps < interval:
        trainer.val_check_interval = max_steps
        return [f"note: trainer.val_check_interval={interval} is past trainer.max_steps={max_steps}: "
                f"validating at step {max_steps} instead"]
    return []


def cpu_oversubscription(trainer: DictConfig, per_node: int) -> List[str]:
    """A note (not an error) when more CPU processes are asked for than this machine has cores."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and _visible_gpus() > 0):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if per_node <= cores:
        return []
    return [f"note: trainer.devices={per_node} starts {per_node} CPU processes on {cores} core(s): they share "
            f"the cores, so each step is slower than with trainer.devices={cores} (results are the same)"]


def check_config(cfg: DictConfig) -> List[str]:
    """Every check that needs only the composed config. Returns notes to print; raises ConfigError."""
    per_node = devices_per_node(cfg.trainer)
    parallel_dims(cfg, per_node)
    check_sequence_length(cfg, per_node)
    return check_memory(cfg, per_node) + cpu_oversubscription(cfg.trainer, per_node) + clamp_schedule(cfg)


def check_data_source(datamodule: Any) -> None:
    """A source that must be fetched (``data=hub``) and is not cached yet: ask it once now.
    Local files (``data=files``) not cached yet: surveyed (``sources.corpus_notes_and_error``):
    binary files and hidden entries named, an empty or too-short corpus refused."""
    source = getattr(datamodule, "text_source", None)
    if hasattr(source, "survey") and not os.path.isdir(datamodule._cache_path()):
        from ring_lightning.data.sources import corpus_notes_and_error

        notes, error = corpus_notes_and_error(source.survey(), datamodule.seq_len, datamodule.max_tokens,
                                              byte_tokens=datamodule.tokenizer_name == "byte")
        if notes and is_launching_process():
            print("\n".join(notes), flush=True)
        if error:
            raise ConfigError(error)
    if not hasattr(source, "check_reachable"):
        return
    if os.path.isdir(datamodule._cache_path()):
        return  # packed windows from an earlier run: no network needed
    source.check_reachable()


# ---------------------------------------------------------------------- vocabulary
def check_vocab_size(cfg: DictConfig, datamodule: Any) -> List[str]:
    """``model.vocab_size`` against the data's tokenizer, before the model is built.

    By default ``model.vocab_size`` follows ``data.tokenizer`` (hydra_presets.py: the tokenizer's
    ids rounded up to a multiple of 64); an explicit value smaller than the tokenizer's ids would
    index past the embedding, so it is refused naming the override and the minimum. Returns a
    note naming the size when it was derived from a tokenizer other than bytes.
    """
    model = cfg.get("model")
    needed = getattr(datamodule, "vocab_size", None)  # loads the tokenizer: its errors are user errors
    if not isinstance(model, DictConfig) or "vocab_size" not in model or not isinstance(needed, int):
        return []  # a model without our vocabulary field (e.g. a Hugging Face model) checks its own
    derived = OmegaConf.is_interpolation(model, "vocab_size")
    value = model.vocab_size
    tokenizer = cfg.data.get("tokenizer", "byte")
    if isinstance(value, int) and not isinstance(value, bool) and value < needed:
        padded = getattr(datamodule, "model_vocab_size", needed)
        raise ConfigError(
            f"model.vocab_size={value} is smaller than the vocabulary of data.tokenizer={tokenizer} ({needed} ids): "
            f"set model.vocab_size >= {needed}, or drop the override: model.vocab_size follows data.tokenizer "
            f"by default ({padded} for this one)")
    if derived and tokenizer != "byte":
        return [f"note: model.vocab_size={value} from data.tokenizer={tokenizer} ({needed} ids, rounded up to a "
                f"multiple of 64)"]
    return []


# ---------------------------------------------------------------------- memory
def _gpu_memory_bytes() -> Optional[int]:
    """Total memory of the first GPU the run uses (torch.cuda; None without CUDA). The launching
    process becomes rank 0 (or spawns the ranks): Lightning's launchers never fork it."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:  # under torchrun every rank asks for its own device (LOCAL_RANK), not all for device 0
        index = int(os.environ.get("LOCAL_RANK", 0) or 0) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(index).total_memory
    except (RuntimeError, ValueError):
        return None  # a driver that cannot say: the device check is skipped, the run says it itself


def _host_available_bytes() -> Optional[int]:
    """Host memory available now: psutil if installed, else /proc/meminfo's MemAvailable (None: unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _memory_inputs(cfg: DictConfig, per_node: int) -> Optional[dict]:
    """The arguments of memory_estimate.estimate_memory for this config; None when the model is not
    described by ModelConfig fields (a Hugging Face or user model: nothing to estimate from)."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig) or not all(k in model for k in ("dim", "n_layers", "n_heads", "vocab_size")):
        return None
    seq_len, batch = cfg.data.get("seq_len"), cfg.data.get("batch_size", 1)
    if not isinstance(seq_len, int) or not isinstance(batch, int):
        return None
    dims = parallel_dims(cfg, per_node)
    sp, ulysses = dims.sp, dims.ulysses
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and _visible_gpus() > 0)
    attention = cfg.module.get("attention") or {}
    return dict(model=OmegaConf.to_container(model, resolve=True), seq_len=seq_len, batch_size=batch, sp=sp,
                ulysses=ulysses, precision=str(cfg.trainer.get("precision", "32-true")),
                loss_chunk_tokens=cfg.module.get("loss_chunk_tokens", None),
                merged_attention=attention.get("segment_lengths") is not None or dims.ring > 1,
                on_gpu=on_gpu, ranks_per_node=per_node, dims=dims)


def _largest_length_that_fits(cfg: DictConfig, dims: ParallelDims, inputs: dict, fits) -> Optional[int]:
    """The longest valid data.seq_len (ring_lightning.lengths) below the configured one that fits."""
    try:
        rules = dims.length_rules(*(_attention_rules(cfg) or ()))
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
                 host_bytes: Optional[int] = None) -> List[str]:
    """The memory estimate of one step (ring_lightning/memory_estimate.py, docs/MEMORY.md) against
    the GPU (GPU runs) and the host (offloaded activations of every rank of the node; on CPU runs
    everything). Refuses a configuration over capacity (with REFUSE_ABOVE's margin) naming the
    overrides that fit; on GPU runs returns the estimate as a note. ``preflight.check_memory=false``
    skips it. ``device_bytes`` / ``host_bytes``: the capacities (default: this machine's)."""
    from ring_lightning import memory_estimate as mem

    if not (cfg.get("preflight") or {}).get("check_memory", True):
        return []
    inputs = _memory_inputs(cfg, per_node)
    if inputs is None:
        return []
    dims = inputs.pop("dims")
    device_cap = device_bytes if device_bytes is not None else (_gpu_memory_bytes() if inputs["on_gpu"] else None)
    host_cap = host_bytes if host_bytes is not None else _host_available_bytes()
    if not inputs["on_gpu"]:
        device_cap = None

    def over(est: "mem.MemoryEstimate", limit: float = mem.REFUSE_ABOVE) -> List[str]:
        where = []
        if device_cap and est.device_total > limit * device_cap:
            where.append("device")
        # the host binds what it holds for the run: offloaded activations, or everything on CPU runs
        # (the per-process share alone is a guess too rough to refuse a GPU run on)
        binding = not est.on_gpu or est.host.get("offloaded inputs", 0) > 0
        if host_cap and binding and est.host_per_node > limit * host_cap:
            where.append("host")
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
    length = _largest_length_that_fits(cfg, dims, inputs, fits)
    if length:
        fixes.append(f"data.seq_len={length}")
    needs = []
    if "device" in where:
        needs.append(f"about {est.device_total / gib:.1f} GiB per GPU ({est.describe(est.device)}) but the GPU "
                     f"has {device_cap / gib:.1f} GiB")
    if "host" in where:
        needs.append(host_text)
    raise ConfigError(
        f"memory: this run needs {' and '.join(needs)}. "
        + (f"It fits with {', or '.join(fixes)}. " if fixes else "No single override fits; lower model size or batch. ")
        + f"The estimate (docs/MEMORY.md) refuses only above {mem.REFUSE_ABOVE:.2f}x the capacity; "
          f"preflight.check_memory=false skips this check")
