"""Pre-flight: the composed Hydra config checked before any process, process group or logger starts.

``train.py`` calls these between composing the config and ``trainer.fit``. A user error found
here is printed once, by the launching process, as one message naming the override to change
and a value that works (``data.seq_len=8192``), and every process exits with status 2 without
a traceback (``HYDRA_FULL_ERROR=1`` shows one). What is checked:

* devices: an accelerator that exists here, no more GPUs than are visible;
* the parallel shape (``ParallelDims``, ring_lightning/sequence/dims.py: the strategy's own checks);
* the sequence length against everything that constrains it (``ring_lightning.sequence.lengths``:
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

The parts: ``errors`` (the message and the exit), ``machine`` (devices, memory), ``shape`` (the
parallel shape and the length), ``memory`` (the estimate), ``checks`` (the entry points below).

Constructor errors (``ValueError`` from the data module, the LM, the strategy) are user errors
too; :func:`user_errors` prefixes the field they name with its config group (``data.batch_size``).
"""

from ring_lightning.preflight.checks import (check_config, check_data_source, check_vocab_size,  # noqa: F401
                                             clamp_schedule)
from ring_lightning.preflight.errors import (EXIT_CONFIG_ERROR, ConfigError, fail,  # noqa: F401
                                             is_launching_process, missing_value_message, user_errors)
from ring_lightning.preflight.machine import cpu_oversubscription, devices_per_node  # noqa: F401
from ring_lightning.preflight.memory import check_memory  # noqa: F401
from ring_lightning.preflight.shape import check_sequence_length, parallel_dims  # noqa: F401
