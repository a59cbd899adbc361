"""Moved to ``ring_lightning.sequence.sharding``; this path stays importable (the same module object, so private names and monkeypatching follow) for existing imports and saved configs."""
import sys

from ring_lightning.sequence import sharding as _moved

sys.modules[__name__] = _moved
