"""The weights of a checkpoint as one plain ``state_dict`` file, from a gathered checkpoint file or
a folder of shards (``RingFSDPStrategy(save_distributed_checkpoint=True)``, any number of ranks)::

    python -m ring_lightning.app.export outputs/run/checkpoints/last.ckpt weights.pt
    python -m ring_lightning.app.export outputs/run/checkpoints/last.ckpt model.pt --prefix model.

The file holds ``{name: tensor}`` and nothing else (no optimizer, no loop state), loadable with
``torch.load(path, weights_only=True)``:

* by default the keys are the LightningModule's (the checkpoint's ``state_dict``), what
  ``LongDocumentLM(...).load_state_dict`` reads: ``model.tok_embeddings.weight``, ...;
* ``--prefix model.`` keeps the keys under the LightningModule's ``model`` attribute with the
  prefix removed, what the bare model's ``load_state_dict`` reads (``LongDocTransformer``:
  ``tok_embeddings.weight``, ...; ``HFCausalLM``'s Hugging Face model: ``model.embed_tokens.weight``,
  ``lm_head.weight``, ...).

A folder is reassembled in this one process (no process group, any number of shards:
``ring_lightning.parallel.sharded_checkpoint.read_full_state``). For a Hugging Face model the
format ``from_pretrained`` reads comes from ``HFCausalLM(export_dir=...)`` at the end of fit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import torch


def consolidated_state_dict(checkpoint: str, prefix: str = "") -> Dict[str, torch.Tensor]:
    """``{name: tensor}`` of ``checkpoint`` (a file or a folder), the keys under ``prefix`` with it
    removed (``""``: every key, as the LightningModule names them).

    Raises:
        ValueError: ``checkpoint`` is not a complete checkpoint, or no key starts with ``prefix``
            (the message lists the first keys there are).
    """
    from ring_lightning.training.checkpoint_io import checkpoint_weights, readable

    if not readable(checkpoint):
        raise ValueError(f"checkpoint={checkpoint} is not a complete checkpoint (missing, damaged, or a folder "
                         f"of shards whose save was cut short); give a .ckpt file or folder that resume=true would take")
    state = checkpoint_weights(checkpoint)
    out = {k[len(prefix):]: v.detach().clone() for k, v in state.items()
           if isinstance(v, torch.Tensor) and k.startswith(prefix)}
    if not out:
        raise ValueError(f"prefix={prefix!r}: no key of {checkpoint} starts with it; its keys start "
                         f"{sorted(state)[:4]} (use --prefix '' for the LightningModule's keys)")
    return out


def export(checkpoint: str, out: str, prefix: str = "") -> int:
    """Write ``consolidated_state_dict(checkpoint, prefix)`` to ``out`` (atomically); returns the
    number of tensors written."""
    from ring_lightning.training.checkpoint_io import atomic_save

    state = consolidated_state_dict(checkpoint, prefix)
    atomic_save(state, out)
    return len(state)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ring_lightning.app.export", description=__doc__.split("::")[0])
    parser.add_argument("checkpoint", help="a checkpoint file or folder of shards (e.g. checkpoints/last.ckpt)")
    parser.add_argument("out", help="the state_dict file to write")
    parser.add_argument("--prefix", default="", help="keep the keys under it, without it (e.g. model.)")
    args = parser.parse_args(argv)
    try:
        count = export(args.checkpoint, args.out, args.prefix)
    except ValueError as exc:
        print(f"ring_lightning.app.export: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {count} tensors from {args.checkpoint}" + (f" (keys under {args.prefix!r})" if args.prefix else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
