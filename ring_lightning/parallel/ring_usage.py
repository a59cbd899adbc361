"""No silent local attention: under sp > 1 every step must attend through the ring.

With the sequence split over ranks, attention computed any other way (a model on transformers'
``sdpa`` / ``eager``, ring cores attached but never called) sees only the rank's own shard and
trains on silently wrong numbers. ``RingStrategy`` asks this module three things:

* :func:`prepare_ring_attention` (setup): the ring attention modules of the LightningModule; a
  Hugging Face model on ``attn_implementation="ring_lightning"`` gets its per-layer cores here
  (``ring_lightning.hf.attach_ring_attention``, registered here by ``ring_lightning.hf``), so the
  strategy sees them before the first step;
* :func:`missing_ring_message` (setup): why the model cannot be sharded, naming the fix (for an HF
  model: its attention implementation), or None;
* :func:`check_ring_called` (after the first training step): the ring cores were called.

Hugging Face models are recognised without importing transformers (a submodule with
``set_attn_implementation`` and a ``config._attn_implementation``).
"""

from __future__ import annotations

import warnings
from typing import Callable, List, NoReturn, Sequence, Tuple

import torch.distributed as dist
from torch import nn

from ring_lightning.attention import ring_attention_modules
from ring_lightning.constants import HF_ATTN_IMPLEMENTATION


def hf_models(module: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(name, model, attn_implementation)`` of the outermost transformers models inside ``module``."""
    found: List[Tuple[str, nn.Module, str]] = []
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if not (hasattr(sub, "set_attn_implementation") and hasattr(config, "_attn_implementation")):
            continue
        if any(name.startswith(outer + ".") or outer == "" for outer, _, _ in found):
            continue  # the inner model of a ForCausalLM shares its config
        found.append((name, sub, str(config._attn_implementation)))
    return found


#: How an HF model on ``attn_implementation="ring_lightning"`` gets its ring cores: ``ring_lightning.hf``
#: registers it when it registers that implementation with transformers (this layer imports nothing
#: above it), so it is there for every model that can be on that implementation.
_HF_ATTACHERS: List[Callable[[nn.Module], None]] = []


def register_hf_attacher(attach: Callable[[nn.Module], None]) -> None:
    """Set how :func:`prepare_ring_attention` gives an HF model on ``"ring_lightning"`` its cores."""
    _HF_ATTACHERS[:] = [attach]


def prepare_ring_attention(module: nn.Module) -> list:
    """Every ring attention module of ``module``, after giving HF models on ``"ring_lightning"`` their cores."""
    for name, model, implementation in hf_models(module):
        if implementation == HF_ATTN_IMPLEMENTATION:
            if not _HF_ATTACHERS:
                raise ValueError(f"{type(model).__name__} (self.{name}) is on attn_implementation="
                                 f"{HF_ATTN_IMPLEMENTATION!r} but ring_lightning.hf was never imported: "
                                 f"`import ring_lightning.hf` before building the model")
            _HF_ATTACHERS[0](model)  # keeps cores already attached (HFCausalLM's variant)
    return ring_attention_modules(module)


def missing_ring_message(module: nn.Module, sp: int, ring_modules: Sequence[nn.Module]) -> "str | None":
    """The error to raise when ``module`` would attend locally under ``sp > 1`` ranks, else None."""
    if sp <= 1:
        return None
    local = [(name, model, impl) for name, model, impl in hf_models(module) if impl != HF_ATTN_IMPLEMENTATION]
    if local:
        name, model, impl = local[0]
        where = f"{type(model).__name__}" + (f" (self.{name})" if name else "")
        return (f"sequence_parallel_size={sp} but the Hugging Face model {where} computes attention with "
                f"attn_implementation={impl!r}: each rank would attend only to its own shard of the sequence. "
                f"Set attn_implementation=\"ring_lightning\": `import ring_lightning.hf` then "
                f"from_pretrained(..., attn_implementation=\"ring_lightning\") or "
                f"model.set_attn_implementation(\"ring_lightning\"); or train ring_lightning.hf.HFCausalLM "
                f"(train.py: model=hf); or sequence_parallel_size=1.")
    if not ring_modules:
        return (f"sequence_parallel_size={sp} but {type(module).__name__} contains no ring attention module "
                f"(ring_lightning.attention.RingAttentionBase): each rank would attend only to its own shard of "
                f"the sequence. Use MultiheadRingAttention / create_ring_attention (a Hugging Face model: "
                f"attn_implementation=\"ring_lightning\" after `import ring_lightning.hf`), or "
                f"sequence_parallel_size=1.")
    return None


def ring_calls(ring_modules: Sequence[nn.Module]) -> int:
    """Calls of the ring attention modules so far (their profilers count every forward)."""
    return sum(m.profiler.calls for m in ring_modules)


def check_ring_called(module: nn.Module, ring_modules: Sequence[nn.Module], calls_before: int, sp: int) -> None:
    """After a training step under ``sp > 1``: an error if no ring core was called (attention was
    computed some other way, on the shard alone); a warning naming cores that were not."""
    if sp <= 1 or not ring_modules:
        return
    if ring_calls(ring_modules) == calls_before:
        raise ValueError(
            f"sequence_parallel_size={sp}: {type(module).__name__}'s training step called none of its "
            f"{len(ring_modules)} ring attention module(s), so its attention saw only this rank's shard of the "
            f"sequence. Call the ring cores in forward (already_split=True); for a Hugging Face model set "
            f"attn_implementation=\"ring_lightning\" (model.set_attn_implementation(\"ring_lightning\") after "
            f"`import ring_lightning.hf`), not sdpa/eager.")
    idle = [m for m in ring_modules if m.profiler.calls == 0]
    if idle and (not dist.is_initialized() or dist.get_rank() == 0):
        warnings.warn(f"{len(idle)} of {len(ring_modules)} ring attention modules were never called in the first "
                      f"training step: attention they should compute ran some other way, or they are unused",
                      UserWarning)


def raise_once(message: str) -> NoReturn:
    """A user error every rank finds alike: rank 0 raises it, the others exit quietly (status 2), so
    the message appears once rather than as one traceback per rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        raise SystemExit(2)
    raise ValueError(message)
