"""Compatibility alias of ``ring_lightning.models.memory_estimate``, kept until release 0.3 (old imports, saved configs' ``_target_``s and checkpoints' hyper-parameters); the same module object, so private names and monkeypatching follow."""
import sys

from ring_lightning.models import memory_estimate as _moved

sys.modules[__name__] = _moved
