"""The parallel shape and the split of the sequence, below the attention.

* ``dims``: :class:`~ring_lightning.sequence.dims.ParallelDims`, the one object for the parallel
  shape (world, dp, sp, ulysses, ring, layout policy) and the length rules it imposes;
* ``lengths``: every rule on the global sequence length (:class:`LengthRules`);
* ``sharding``: layouts, global positions, shard / gather, the active sharding of a step;
* ``groups``: the rank lists of the hybrid's all-to-all and ring groups.
* ``faults``: a lost peer told from a collective's error (the ring's comm reads it, so it sits
  below the attention).

Nothing here imports the attention, Lightning or the strategy: those ask this package.
This ``__init__`` imports nothing, so importing one part never runs the others.
"""
