"""RingFSDPStrategy: sequence parallelism for Lightning with the model state sharded by FSDP2.

``RingStrategy`` (ring_lightning/strategy.py) replicates the model on every rank (DDP): about
16 bytes per parameter (float32 weights, gradients, AdamW's two moments) on each GPU before any
activation. This strategy keeps everything sequence-parallel exactly as there, by wrapping the
same :class:`~ring_lightning.parallel.core.SequenceParallel` (mesh, sampler, batch sharding, the
loss contract, the shard context, the ring-usage checks), and shards the model with PyTorch's
``fully_shard`` (FSDP2) instead of replicating it.

Which ranks share a shard: the whole flattened ``(dp, sp)`` world. Under DDP the parameters
are replicated across *both* axes (the ranks of a sequence group hold the same weights and
reduce the same gradients), so sharding over the whole world is what divides the per-GPU model
state by the world size; torchtitan shards over its flattened ``dp_shard x cp`` dimensions for
the same reason. Sharding over ``dp`` only would leave ``sp`` full copies in every group.

Gradients: FSDP2 reduce-scatters the gradients averaged over the shard world, as DDP all-reduces
averaged over the world, so the loss contract's scale (``ring_lightning.parallel.loss_contract``) gives the
``sp=1`` gradient here exactly as under DDP (tests/distributed/test_fsdp.py checks it).

Why Lightning's ``ModelParallelStrategy`` as the base and not ``DDPStrategy``: it is Lightning's
FSDP2 shell (no DDP wrapper to undo; a launcher, process group, ``device_mesh`` seen by
``configure_model``, optimizer setup after sharding, state dicts through
``torch.distributed.checkpoint``: gathered into one file, or sharded with
``save_distributed_checkpoint=True``). What it lacks is a sequence dimension and a sharding of its
own (it asks the module to shard itself in ``configure_model``); this class adds both.

What is sharded (as torchtitan does for its models, without knowing the model): every entry of
every ``nn.ModuleList`` (the transformer blocks; each gathers its parameters only around its own
forward and backward), then the LightningModule itself as the root, holding the rest
(embeddings, norms, head). The root's ``training_step`` / ``validation_step`` / ``test_step`` /
``predict_step`` are registered as FSDP forward methods, so a module that computes its loss from
its submodules' methods or weights directly (LongDocumentLM's chunked loss reads the head's
weight) sees them gathered for the whole step. A module that applied ``fully_shard`` itself in
``configure_model`` is left as it is.

Precision and host memory (:func:`mixed_precision_policy`, :func:`offload_policy`): under a bf16
trainer precision the gathered weights are bf16 and gradients are reduced in float32 into the
shards (float32 ones unless ``bf16-true`` made the module bf16), as torchtitan does; ``offload_params=True`` keeps the shards, their gradients and
AdamW's moments on the host (a model larger than the GPU trains on one GPU).

The model's memory options train as under DDP (tests/distributed/test_fsdp.py): activation
checkpointing (full, k blocks per group, selective), MLP tiles, the chunked loss, and activation
offload (``checkpointing=offload``). Offload's recomputation
(``ring_lightning.models.activations.recompute_offloaded``) calls the blocks in backward, where
FSDP2's hooks gather their parameters into new tensors; it back-propagates through them in place,
so the gradients accumulate there and FSDP2 reduce-scatters them into the shards. A group of k
blocks (``model.blocks_per_checkpoint``) keeps its k blocks' parameters gathered from its
recomputation until each block's backward has run. Offload takes one forward per backward here:
a training step that runs the model twice with gradient is refused at its backward, naming the
options that train it (``INTERLEAVED_IN_PLACE``; FSDP2 would drop a block's second recomputation's
gradients).

Checkpoints (``save_distributed_checkpoint=True``): a folder of shards in Lightning's layout,
written under a staging name and renamed into place once every rank has written
(:meth:`RingFSDPStrategy.save_checkpoint`, ring_lightning/parallel/sharded_checkpoint.py), which
``train.py resume=true`` chooses as it chooses files (ring_lightning/training/checkpoint_io.py).
Lightning's ``load_checkpoint`` reads it through ``torch.distributed.checkpoint``, which reshards:
a checkpoint of 4 ranks resumes on 2 with the weights and AdamW's moments bit for bit
(tests/integration/test_resume_sharded.py). ``python -m ring_lightning.app.export`` writes its
weights as one plain ``state_dict`` file.

Refused: gradient compression (DDP communication hooks; FSDP2 has none), in the pre-flight too.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)

from ring_lightning.parallel import loss_contract
from ring_lightning.constants import IGNORE_INDEX
from ring_lightning.parallel.shell import SequenceParallelShell
from ring_lightning.parallel.core import DP_AXIS, SP_AXIS, SequenceParallel
from ring_lightning.parallel.sharded_checkpoint import save_folder
from ring_lightning.sequence.dims import ParallelDims, check_layout_policy, check_sp_request, check_ulysses_size

#: The LightningModule's methods that run as FSDP forwards (parameters gathered around them).
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
START_METHODS = ("popen", "spawn", "fork", "forkserver")
#: ``mixed_precision``: "auto" follows ``trainer.precision`` (bf16 for ``bf16-mixed`` / ``bf16-true``).
MIXED_PRECISION = ("auto", "bf16", "none")


def gathers_bf16(mixed_precision: str, trainer_precision: str) -> bool:
    """Whether FSDP2 gathers the weights in bf16: the one decision the strategy and the pre-flight's
    memory estimate both read."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"strategy.mixed_precision={mixed_precision!r} is not valid; valid values: {MIXED_PRECISION}")
    return mixed_precision == "bf16" or (mixed_precision == "auto" and str(trainer_precision).startswith("bf16"))


def mixed_precision_policy(mixed_precision: str, trainer_precision: str) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision: bf16 gathered weights (the compute), float32 gradient reduction
    into the sharded weights AdamW steps (float32 unless ``trainer.precision=bf16-true`` made the
    module bf16). ``"none"``: the weights' dtype."""
    if not gathers_bf16(mixed_precision, trainer_precision):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def offload_policy(offload_params: bool, device_type: str) -> OffloadPolicy:
    """FSDP2's host offload of the model state: sharded float32 weights, their gradients and so the
    optimizer's moments live in (pinned, on a GPU run) host memory; each unit's shard is copied to
    the device for its all-gather, and the optimizer steps on the host."""
    if not offload_params:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device_type == "cuda")


def shard_model(module: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True,
                mp_policy: Optional[MixedPrecisionPolicy] = None, offload: Optional[OffloadPolicy] = None) -> int:
    """``fully_shard`` each ``nn.ModuleList`` entry, then ``module`` as the root (module docstring);
    returns the number of FSDP units made. A module that holds FSDP units already is left alone."""
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return 0
    blocks = [b for m in module.modules() if isinstance(m, nn.ModuleList) for b in m
              if any(p.requires_grad for p in b.parameters())]
    mp_policy = mp_policy or MixedPrecisionPolicy()
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload or OffloadPolicy())
    # A block takes its inputs as given, uncast: torch 2.11's FSDP2 does not cast the inputs of a
    # checkpoint's recomputation (2.13's does), so a block whose forward saw bf16 rotary tables would recompute
    # from float32 ones (torch.utils.checkpoint refuses: seen on torch 2.11, one H200). The root
    # casts its own (integer) inputs as the policy says; the residual stream is the bf16 embedding's.
    block_policy = dataclasses.replace(mp_policy, cast_forward_inputs=False)
    for block in reversed(blocks):  # modules() is pre-order: reversed, a nested list's entries come first
        fully_shard(block, mp_policy=block_policy, **options)
    fully_shard(module, mp_policy=mp_policy, **options)
    for name in STEP_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return len(blocks) + 1


class RingFSDPStrategy(SequenceParallelShell, ModelParallelStrategy):
    """FSDP2 over the flattened ``(dp, sp)`` world with sequence sharding and ring attention wiring.

    Args:
        sequence_parallel_size, layout, ulysses_size, loss_reduction, shift_labels, label_key,
            ignore_index: as for :class:`~ring_lightning.parallel.strategy.RingStrategy` (same meaning,
            same checks, same core).
        compression: only ``"none"``: gradient compression is a DDP communication hook and
            FSDP2 has none (a ValueError names ``strategy.compression``). The other
            compression arguments a config merges in are accepted and must be unused.
        reshard_after_forward: free each block's gathered parameters after its forward and
            gather them again in backward (FSDP2's ZeRO-3; ``False``: keep them, ZeRO-2-like).
        mixed_precision: ``"auto"`` (default): bf16 when ``trainer.precision`` is bf16 (``bf16-mixed``
            or ``bf16-true``), else none; ``"bf16"``: gathered weights in bf16 (the compute), gradients
            reduced in float32 into the sharded weights (float32 unless ``trainer.precision=bf16-true``
            made the module bf16); ``"none"``: the
            weights' own dtype throughout. Lightning's autocast still applies under ``bf16-mixed``.
        offload_params: keep the sharded model state (float32 weights, gradients, AdamW's moments)
            in pinned host memory and step the optimizer there (FSDP2's ``CPUOffloadPolicy``): about
            16 bytes per parameter / world move from each GPU to its host; the device holds only the
            gathered units of the moment. The process group is ``cuda:nccl,cpu:gloo`` so collectives
            on host tensors (the gradient norm for clipping) have a backend.
        save_distributed_checkpoint: ``False`` (default): checkpoints gather the full state
            into one file (Lightning's format, loadable anywhere; rank 0 holds the whole state
            while writing); ``True``: a folder of shards through ``torch.distributed.checkpoint``
            (Lightning's layout; no rank holds the whole state), written whole or not at all
            (:meth:`save_checkpoint`). Both resume as DDP does (tests/distributed/test_fsdp.py),
            through ``train.py resume=true`` too, and a folder resumes on another number of
            processes (resharded; tests/integration/test_resume_sharded.py).
        start_method: ``"popen"`` (Lightning re-runs the script per rank) or a multiprocessing
            start method (``spawn``...), as for ``DDPStrategy``.
        process_group_backend, timeout: as for ``ModelParallelStrategy``.
    """

    strategy_name = "ring_fsdp"

    def __init__(
        self,
        sequence_parallel_size: Union[int, str] = "auto",
        layout: str = "auto",
        ulysses_size: int = 1,
        loss_reduction: str = "mean",
        shift_labels: Optional[bool] = None,
        label_key: str = "labels",
        ignore_index: int = IGNORE_INDEX,
        compression: str = "none",
        reshard_after_forward: bool = True,
        mixed_precision: str = "auto",
        offload_params: bool = False,
        save_distributed_checkpoint: bool = False,
        start_method: str = "popen",
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
        **compression_kwargs: Any,
    ) -> None:
        check_sp_request(sequence_parallel_size)
        if loss_reduction not in loss_contract.LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction={loss_reduction!r} is not valid; valid values: {loss_contract.LOSS_REDUCTIONS}")
        if shift_labels not in (None, True, False):
            raise ValueError(f"shift_labels must be None, True or False, got {shift_labels!r}")
        if compression != "none":
            raise ValueError(
                f"strategy.compression={compression!r} is not supported by RingFSDPStrategy: gradient compression "
                f"is a DDP communication hook and FSDP2 has none. Use compression=none, or strategy=ring (DDP).")
        unknown = set(compression_kwargs) - {"compression_ratio", "powersgd_rank", "error_feedback",
                                              "powersgd_start_iter"}
        if unknown:
            raise TypeError(f"RingFSDPStrategy got unexpected arguments {sorted(unknown)}")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is not valid; valid values: {START_METHODS}")
        check_ulysses_size(ulysses_size, sequence_parallel_size)
        check_layout_policy(layout)
        mixed_precision_policy(mixed_precision, "32-true")  # names the field on a bad value, now
        if not isinstance(offload_params, bool):
            raise ValueError(f"strategy.offload_params must be true or false, got {offload_params!r}")
        kwargs: Dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self._sp_request = sequence_parallel_size
        self.layout, self.ulysses_size = layout, ulysses_size
        self.reshard_after_forward = reshard_after_forward
        self.mixed_precision, self.offload_params = mixed_precision, offload_params
        self._start_method = start_method
        self._sequence = SequenceParallel(loss_reduction, shift_labels, label_key, ignore_index)

    compression = "none"  # read by configs and reports as for RingStrategy

    # ------------------------------------------------------------------ shape and mesh

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:
            return
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        sp = self.sequence_parallel_size
        # Check before init_process_group: every rank fails the same way, nobody waits.
        ParallelDims(self.num_nodes * self.num_processes, sp, self.ulysses_size, self.layout)
        self._setup_distributed()  # ModelParallelStrategy's: accelerator, ranks, process group
        dims = ParallelDims(dist.get_world_size(), sp, self.ulysses_size, self.layout)
        self._device_mesh = self._sequence.build(dims, self.root_device.type)
        if self.lightning_module is not None:  # seen by configure_model, as under ModelParallelStrategy
            self.lightning_module._device_mesh = self._device_mesh

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self.offload_params and self.root_device.type == "cuda":
            return "cuda:nccl,cpu:gloo"  # offloaded gradients are host tensors: their norm's all-reduce
        return super()._get_process_group_backend()

    @property
    def shard_mesh(self) -> DeviceMesh:
        """The 1-D mesh FSDP2 shards over: the whole (dp, sp) world, ranks in mesh order."""
        return DeviceMesh.from_group(dist.group.WORLD, self.root_device.type)

    # ------------------------------------------------------------------ model and steps

    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        self._sequence.prepare(self.lightning_module, self.sequence_parallel_size)
        self.model = self.precision_plugin.convert_module(self.model)
        if not self.offload_params:  # offloaded: fully_shard moves one unit at a time and keeps its shard on the host
            self.model_to_device()
        if _distributed_is_initialized():
            shard_model(self.model, self.shard_mesh, self.reshard_after_forward,
                        mixed_precision_policy(self.mixed_precision, self.precision_plugin.precision),
                        offload_policy(self.offload_params, self.root_device.type))
        if self.offload_params:  # the module computes on the GPU though its shards live on the host
            for m in self.model.modules():
                if isinstance(m, _DeviceDtypeModuleMixin):
                    m._device = self.root_device
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)  # after sharding: the optimizer holds the shards
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.offload_params:  # offloaded: its state stays on the host
            _optimizers_to_device(self.optimizers, self.root_device)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self.reshard_after_forward:
            # A forward without backward (validation, the sanity check) leaves the blocks gathered
            # under reshard_after_forward=False. Sharded again here, so a step starts from the shards:
            # recompute_offloaded (checkpointing=offload) is given the blocks' parameters at forward and
            # must see other tensors read in its recomputation to back-propagate into FSDP2's gathered
            # ones; given the gathered ones themselves, their gradients would reach them after FSDP2's
            # reduce-scatter and the shards would get none.
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        return super().training_step(*args, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """A gathered file: rank 0 hands it to the trainer's checkpoint writer (``AtomicCheckpointIO``,
        which replaces a folder checkpoint at the path only once the file is whole).
        A folder of shards: the layout Lightning writes and reads (the ``state_dict`` and
        ``optimizer_<i>`` shards through ``torch.distributed.checkpoint``, the rest in ``meta.pt``,
        here through the trainer's checkpoint writer as a file is), under a staging name that rank
        0 renames into place once every rank has written (ring_lightning/parallel/sharded_checkpoint.py):
        a save killed half-way never leaves a folder that looks complete."""
        if not self._save_distributed_checkpoint:
            # Not ModelParallelStrategy's: it removes a folder checkpoint at the path (a run that switched
            # from folders) before the file is written. The trainer's writer (AtomicCheckpointIO) replaces
            # the folder once the file is whole.
            return ParallelStrategy.save_checkpoint(self, checkpoint, self.broadcast(filepath), storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        save_folder(self, checkpoint, filepath)


if "ring_fsdp" not in StrategyRegistry:
    StrategyRegistry.register("ring_fsdp", RingFSDPStrategy,
                              description="Sequence-parallel ring attention with FSDP2 over the (dp, sp) world")
