"""Compatibility alias of ``ring_lightning.training.schedule``, kept until release 0.3 (old imports, saved configs' ``_target_``s and checkpoints' hyper-parameters); the same module object, so private names and monkeypatching follow."""
import sys

from ring_lightning.training import schedule as _moved

sys.modules[__name__] = _moved
