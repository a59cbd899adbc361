"""The flat module paths of before the packages stay importable until release 0.3: README imports,
saved configs' ``_target_``s and checkpoints' hyper-parameters name them."""
import importlib

import pytest

MOVED = {
    "model": "models.model", "model_config": "models.model_config", "activations": "models.activations",
    "loss": "models.loss", "memory_estimate": "models.memory_estimate", "flops": "models.flops",
    "strategy": "parallel.strategy", "compression": "parallel.compression",
    "compression_checkpoint": "parallel.compression_checkpoint", "loss_contract": "parallel.loss_contract",
    "ring_usage": "parallel.ring_usage", "faults": "sequence.faults", "module": "training.module",
    "training_metrics": "training.training_metrics", "schedule": "training.schedule",
    "callbacks": "training.callbacks", "checkpoint_io": "training.checkpoint_io", "run_log": "training.run_log",
    "console": "training.console", "run_dir": "app.run_dir", "resume_compat": "app.resume_compat",
    "run_report": "app.run_report", "sweep_report": "app.sweep_report", "hydra_presets": "app.hydra_presets",
    "lengths": "sequence.lengths", "sharding": "sequence.sharding", "sequence_groups": "sequence.groups",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_moved_module(old):
    moved = importlib.import_module(f"ring_lightning.{MOVED[old]}")
    assert importlib.import_module(f"ring_lightning.{old}") is moved


def test_old_targets_and_public_names_resolve():
    from hydra.utils import get_class

    from ring_lightning.training.callbacks import AtomicCheckpointIO
    from ring_lightning.training.module import LongDocumentLM

    assert get_class("ring_lightning.callbacks.AtomicCheckpointIO") is AtomicCheckpointIO
    assert get_class("ring_lightning.module.LongDocumentLM") is LongDocumentLM
    import ring_lightning

    assert ring_lightning.LongDocumentLM is LongDocumentLM
    assert ring_lightning.RingStrategy is importlib.import_module("ring_lightning.parallel.strategy").RingStrategy


def test_a_checkpoint_naming_old_targets_resumes_without_notes():
    from ring_lightning.app.resume_compat import classify

    saved = {"module._target_": "ring_lightning.module.LongDocumentLM",
             "trainer.plugins": [{"_target_": "ring_lightning.callbacks.AtomicCheckpointIO"}]}
    now = {"module._target_": "ring_lightning.training.module.LongDocumentLM",
           "trainer.plugins": [{"_target_": "ring_lightning.training.callbacks.AtomicCheckpointIO"}]}
    assert classify(saved, now) == ([], [])
    refused, notes = classify({"module._target_": "my_project.MyLM"}, {"module._target_": now["module._target_"]})
    assert not refused and len(notes) == 1 and "module._target_ 'my_project.MyLM'" in notes[0]
