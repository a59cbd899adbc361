"""Sequence parallelism inside Lightning, above the attention and the model.

* ``core``: :class:`~ring_lightning.parallel.core.SequenceParallel`, what every sequence-parallel
  strategy does whatever wraps the model (mesh, sampler, batch sharding, the loss contract, the
  shard context around steps, the ring-usage checks);
* ``strategy``: :class:`~ring_lightning.parallel.strategy.RingStrategy`, its DDP shell;
* ``fsdp``: :class:`~ring_lightning.parallel.fsdp.RingFSDPStrategy` (``"ring_fsdp"``), the same core
  with the model state sharded by FSDP2 over the whole (dp, sp) world;
* ``step``: :class:`~ring_lightning.parallel.step.BatchShard`, the facts of one batch;
* ``length_check``: a trainer's sequence length against its attention and parallel shape;
* ``loss_contract``: how a module's token loss is reduced over the sequence ranks;
* ``ring_usage``: no silent local attention (HF models on sdpa refused, ring calls checked);
* ``compression``, ``compression_checkpoint``: DDP gradient-compression hooks and their state
  in checkpoints.

The shape itself (:class:`~ring_lightning.sequence.dims.ParallelDims`) lives below the attention,
in ``ring_lightning.sequence``. This ``__init__`` imports nothing.
"""
