"""The gradient-compression hooks' state in checkpoints (compression.py's hooks own it).

Error feedback is each rank's own, so a checkpoint carries every rank's hook state: rank 0
gathers them (``gather_compression_state``, in ``RingStrategy.save_checkpoint``), each rank of
a resumed run keeps only its own entry (``this_rank_state``) and hands it to its new hook
(``restore_compression_state``) before the first resumed step. A state saved under another
method (or another number of ranks) is dropped with a warning: the memory starts empty.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

CHECKPOINT_KEY = "compression_states"  #: checkpoint entry: every rank's hook state, by rank


def gather_compression_state(state: Any) -> Optional[List[Dict[str, Any]]]:
    """Every rank's hook state (error feedback is each rank's own), gathered on rank 0 for its
    checkpoint; ``None`` on the other ranks and for stateless hooks. A collective: every rank
    calls it. It travels over a CPU (gloo) group, so no GPU holds every rank's copy; the
    checkpoint grows by one fp32 copy of the parameters per rank for ``topk``/``randomk``."""
    if not hasattr(state, "state_dict"):
        return None
    mine = state.state_dict()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=_cpu_group())
    return everyone


_CPU_GROUP: List[Any] = []  # the gloo group over the world, made once (a collective) when first needed


def _cpu_group():
    if dist.get_backend() == "gloo":
        return None
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


def this_rank_state(saved: Optional[List[Dict[str, Any]]], rank: int) -> Optional[Tuple[int, Dict[str, Any]]]:
    """(ranks that saved, this rank's entry) of a checkpoint's states: the rest need not be kept."""
    return None if not saved else (len(saved), saved[rank] if rank < len(saved) else None)


def restore_compression_state(state: Any, resume: Optional[Tuple[int, Dict[str, Any]]]) -> None:
    """Give the hook this rank's saved state (a resumed run on the same number of ranks)."""
    if state is None or resume is None or not hasattr(state, "load_state_dict"):
        return
    ranks, mine = resume
    if ranks != dist.get_world_size() or mine is None:
        import warnings

        warnings.warn(f"the checkpoint's gradient-compression state is from {ranks} ranks, this run has "
                      f"{dist.get_world_size()}: the compression memory starts empty", stacklevel=2)
        return
    expected = set(state.state_dict())
    if set(mine) != expected:  # saved by another method (topk's residuals vs powersgd's iter)
        import warnings

        warnings.warn(f"the checkpoint's gradient-compression state ({sorted(mine)}) is not this method's "
                      f"({sorted(expected)}): it was saved under another compression; the compression memory "
                      f"starts empty", stacklevel=2)
        return
    state.load_state_dict(mine)
