"""Moved to ``ring_lightning.sequence.groups``; this path stays importable (the same module object, so private names and monkeypatching follow) for existing imports and saved configs."""
import sys

from ring_lightning.sequence import groups as _moved

sys.modules[__name__] = _moved
