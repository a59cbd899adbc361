"""One protocol for every attention mask: causality, packed documents, block grids, grid windows.

A mask answers four questions, all in GLOBAL token positions, so that it does not depend
on the layout, the rank or the order the kernel sees tokens in:

* ``keeps(q_range, k_range)``: can a query in positions ``[q0, q1)`` see any key in
  ``[k0, k1)``? False lets the ring skip that (query piece, key piece) task and, where no
  other task reads them, the K/V transfer. The answer must be the same on every rank (a pure
  function of positions and of data every rank holds), so sender and receiver agree;
  it may be conservative (True for an empty pair only costs compute).
* ``token_mask(qpos, kpos)``: the (query, key) pairs allowed among tokens at positions
  ``qpos`` (S, M) and ``kpos`` (S, L): a bool tensor broadcastable to (B, S, M, L), or None
  when it allows every pair. The portable kernel's tile masks come from here.
* ``mask_mod(device)``: FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` in the caller's order,
  reading tensors on ``device``.
* ``dense(n, device)``: the whole (1|B, N, N) mask: the reference, the attention weights
  (multihead.py) and the checks of the other three answers (tests/unit/attention/test_masks.py).

Masks combine by AND (``MaskSet``). Each kind registers itself with ``register_mask``; to add
one: a new file with its class, ``@register_mask``, and its import in ``attention/__init__.py``
(the example the property test runs goes next to the others in tests/unit/attention/test_masks.py).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple, Type

import torch

from .plan import FilteredPlan

MASKS: Dict[str, Type["AttentionMask"]] = {}  #: kind -> class, every registered mask


def register_mask(cls: Type["AttentionMask"]) -> Type["AttentionMask"]:
    if cls.kind in MASKS and MASKS[cls.kind] is not cls:
        raise ValueError(f"mask kind {cls.kind!r} is registered twice ({MASKS[cls.kind].__name__}, {cls.__name__})")
    MASKS[cls.kind] = cls
    return cls


class AttentionMask:
    """Base of every mask: by default it allows everything (module docstring for the answers)."""

    kind = "none"
    #: why the mask cannot combine with packed documents (ValueError text), None when it can
    refuses_documents: Optional[str] = None

    def keeps(self, q_range: Tuple[int, int], k_range: Tuple[int, int]) -> bool:
        return True

    def token_mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def mask_mod(self, device=None) -> Callable:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= 0  # all True, in the index dtype flex traces with

        return mask_mod

    def flex_form(self, is_causal: bool, device) -> Optional[tuple]:
        """``(order, inverse, block_mask)`` when this mask, alone with causality, builds its own
        FlexAttention call (a token order of its own, a cached block mask); None: flex.py builds
        the block mask from the masks' answers."""
        return None

    def dense(self, n: int, device=None) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        allowed = self.token_mask(pos[None], pos[None])  # (1|B, 1, N, N)
        return torch.ones(1, n, n, dtype=torch.bool, device=device) if allowed is None else allowed[:, 0]


@register_mask
class CausalMask(AttentionMask):
    """A query sees the keys at its own position and before."""

    kind = "causal"

    def keeps(self, q_range, k_range) -> bool:
        return k_range[0] <= q_range[1] - 1

    def token_mask(self, qpos, kpos):
        return (kpos[:, None, :] <= qpos[:, :, None])[None]  # (1, S, M, L)

    def mask_mod(self, device=None):
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        return mask_mod


class MaskSet:
    """Masks ANDed: every answer is the conjunction of the members' answers."""

    def __init__(self, masks: Iterable[AttentionMask] = ()) -> None:
        self.masks: Tuple[AttentionMask, ...] = tuple(masks)

    @property
    def kinds(self) -> frozenset:
        return frozenset(m.kind for m in self.masks)

    def without(self, kind: str) -> "MaskSet":
        return MaskSet(m for m in self.masks if m.kind != kind)

    def keeps(self, q_range, k_range) -> bool:
        return all(m.keeps(q_range, k_range) for m in self.masks)

    def token_mask(self, qpos, kpos) -> Optional[torch.Tensor]:
        out = None
        for m in self.masks:
            t = m.token_mask(qpos, kpos)
            if t is not None:
                out = t if out is None else out & t
        return out

    def mask_mod(self, device=None) -> Callable:
        mods = [m.mask_mod(device) for m in self.masks]

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= 0
            for mod in mods:
                keep = keep & mod(b, h, q_idx, kv_idx)
            return keep

        return mask_mod

    def dense(self, n: int, device=None) -> torch.Tensor:
        out = torch.ones(1, n, n, dtype=torch.bool, device=device)
        for m in self.masks:
            out = out & m.dense(n, device)
        return out

    def restrict(self, plan):
        """``plan`` without the tasks whose query and key pieces the masks keep apart."""
        if not self.masks:
            return plan

        def keeps(p, dst, task, src):
            qp, kp = p.pieces[dst][task.q_piece], p.pieces[src][task.k_piece]
            return self.keeps((qp.start, qp.start + qp.length), (kp.start, kp.start + kp.length))

        return FilteredPlan(plan, keeps)
