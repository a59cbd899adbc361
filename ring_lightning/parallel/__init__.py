"""Sequence parallelism inside Lightning, above the attention.

* ``core``: :class:`~ring_lightning.parallel.core.SequenceParallel`, what every sequence-parallel
  strategy does whatever wraps the model (mesh, sampler, batch sharding, the loss contract, the
  shard context around steps, the ring-usage checks); ``RingStrategy`` (``ring_lightning.parallel.strategy``)
  is its DDP shell;
* ``step``: :class:`~ring_lightning.parallel.step.BatchShard`, the facts of one batch;
* ``length_check``: a trainer's sequence length against its attention and parallel shape.

The shape itself (:class:`~ring_lightning.sequence.dims.ParallelDims`) lives below the attention,
in ``ring_lightning.sequence``. This ``__init__`` imports nothing.
"""
