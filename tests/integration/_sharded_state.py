"""A test-only callback for test_resume_sharded.py: the whole model and optimizer state a resumed
run starts from, written by rank 0 (every rank gathers its shards: a collective)."""

import lightning.pytorch as pl
import torch


class DumpStartState(pl.Callback):
    """At ``on_train_start`` (the checkpoint loaded, no step taken) rank 0 writes ``path``:
    ``{"state_dict": {name: tensor}, "optimizer_0": {"state": {name: {...}}, "param_groups": [...]},
    "global_step": int}``, the whole tensors gathered from the FSDP2 shards."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = trainer.optimizers[0]
        state = {"state_dict": get_model_state_dict(pl_module, options=options),
                 "optimizer_0": get_optimizer_state_dict(pl_module, optimizer, options=options),
                 "global_step": trainer.global_step}
        if trainer.is_global_zero:
            torch.save(state, self.path)
