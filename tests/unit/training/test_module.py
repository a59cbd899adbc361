"""LongDocumentLM: trains on CPU, logs what it promises, validates its arguments, subclasses."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from ring_lightning.sequence import sharding
from ring_lightning.attention import RingAttentionBase
from ring_lightning.data import LongDocumentDataModule
from ring_lightning.training.module import LongDocumentLM, WarmupCosine

TINY = {"preset": "tiny"}


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return Trainer(**{**defaults, **kwargs})


def retrieval_data(**kwargs):
    return LongDocumentDataModule(source="retrieval", seq_len=64, batch_size=4, retrieval_num_samples=16,
                                  val_fraction=0.25, **kwargs)


class LabelSmoothingLM(LongDocumentLM):
    """The subclassing example of the module docstring: only the loss changes."""

    def __init__(self, smoothing: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.smoothing = smoothing

    def compute_loss(self, logits, batch):
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=self.smoothing, reduction="sum")
        return loss, (labels != -100).sum()


def test_fast_dev_run_trains_with_finite_loss_and_logs():
    module = LongDocumentLM(model=TINY, attention={"variant": "standard"}, warmup_steps=2)
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(fast_dev_run=2)
    t.fit(module, datamodule=retrieval_data())
    logged = t.callback_metrics
    assert math.isfinite(logged["train/loss"].item()) and math.isfinite(logged["val/loss"].item())
    assert {"train/ppl", "val/ppl", "lr", "perf/tokens_per_s", "perf/peak_memory_mb", "ring/total_ms"} <= set(logged)
    assert "val/retrieval_acc" in logged and 0.0 <= logged["val/retrieval_acc"].item() <= 1.0
    assert "perf/mfu" not in logged  # no MFU on CPU
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_subclass_overriding_compute_loss_trains(tmp_path):
    module = LabelSmoothingLM(smoothing=0.1, model=dict(TINY, checkpointing="full"), lr=1e-3, warmup_steps=1)
    t = trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    t.fit(module, datamodule=LongDocumentDataModule(seq_len=64, batch_size=2, max_tokens=5_000,
                                                   cache_dir=str(tmp_path)))
    assert t.global_step == 2 and math.isfinite(t.callback_metrics["train/loss"].item())
    assert module.hparams.smoothing == 0.1 and module.hparams.model["checkpointing"] == "full"


class HalfMetricData(LongDocumentDataModule):
    """Plain text data with its own task metric: the module logs it without knowing the task."""

    task_metric = "half"

    @staticmethod
    def task_metric_fn(logits, labels):
        return torch.tensor(1.0), torch.tensor(2.0)


def test_validation_logs_the_metric_the_data_supplies(tmp_path):
    data = dict(seq_len=64, batch_size=2, max_tokens=5_000, cache_dir=str(tmp_path))
    plain = LongDocumentDataModule(**data)
    assert plain.task_metric is None and plain.task_metric_fn is None
    t = trainer(fast_dev_run=1)
    t.fit(LongDocumentLM(model=TINY, warmup_steps=1), datamodule=plain)
    assert "val/loss" in t.callback_metrics and not any(k.endswith("_acc") for k in t.callback_metrics)
    t = trainer(fast_dev_run=1)
    t.fit(LongDocumentLM(model=TINY, warmup_steps=1), datamodule=HalfMetricData(**data))
    assert t.callback_metrics["val/half"].item() == 0.5 and "val/retrieval_acc" not in t.callback_metrics


def test_setup_detaches_ring_attention_from_process_groups():
    module = LongDocumentLM(model=TINY, attention={"variant": "standard", "segment_lengths": [16, 32],
                                                   "dilation_rates": [1, 2]})
    rings = [m for m in module.modules() if isinstance(m, RingAttentionBase)]
    assert len(rings) == module.model.config.n_layers
    assert rings[0].config.segment_lengths == [16, 32]
    seen = []  # the sharding every attention call of the fit read
    for m in rings:
        m.register_forward_pre_hook(lambda mod, args: seen.append(sharding.active_sequence_sharding()))
    t = trainer(fast_dev_run=1)
    t.fit(module, datamodule=retrieval_data())
    # never a lazily resolved default group: every call read the "nothing split" the LM
    # declared, and the previous default came back when the fit ended
    assert seen and all(s is sharding.NOTHING_SPLIT for s in seen)
    assert sharding.active_sequence_sharding() is None


def test_prepare_batch_adds_positions_and_loss_masks_tokens():
    module = LongDocumentLM(model=TINY)
    zeros = torch.zeros(2, 8, dtype=torch.long)
    batch = module.prepare_batch({"input_ids": zeros, "labels": zeros})
    assert torch.equal(batch["position_ids"], torch.arange(8).expand(2, 8))
    given = {**batch, "position_ids": torch.arange(8, 16).expand(2, 8)}
    assert module.prepare_batch(given)["position_ids"][0, 0] == 8  # kept: global positions
    logits = torch.randn(2, 8, 259)
    labels = torch.randint(259, (2, 8))
    labels[0, :3] = -100
    mask = torch.ones(2, 8)
    mask[1] = 0
    loss_sum, n = module.compute_loss(logits, {"labels": labels, "loss_mask": mask})
    assert n.item() == 5
    expected = F.cross_entropy(logits[0, 3:], labels[0, 3:], reduction="sum")
    torch.testing.assert_close(loss_sum, expected)
    loss, logged = module.reduce_loss(loss_sum, torch.tensor(0.0))  # no trainer, no tokens: no NaN
    assert torch.isfinite(loss)


def test_optimizer_groups_and_warmup_cosine_schedule():
    module = LongDocumentLM(model=TINY, lr=1e-3, weight_decay=0.1, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    config = module.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert config["lr_scheduler"]["interval"] == "step"
    f = WarmupCosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(attention={"variant": "fast"}), "variant"),
        (dict(attention={"segment_length": [8]}), "segment_length"),
        (dict(attention={"dropout": 2.0}), "dropout"),
        (dict(lr=0.0), "lr"),
        (dict(betas=(0.9,)), "betas"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(max_steps=0), "max_steps"),
        (dict(model={"preset": "tiny", "n_kv_heads": 3}), "n_kv_heads"),
    ],
)
def test_bad_arguments_raise_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LongDocumentLM(**{"model": TINY, **kwargs})


def test_vocab_smaller_than_data_is_an_error():
    module = LongDocumentLM(model=dict(TINY, vocab_size=100))
    with pytest.raises(ValueError, match="vocab_size"):
        trainer(fast_dev_run=1).fit(module, datamodule=retrieval_data())


def test_distributed_checkpoint_settings_turn_on_selective_checkpointing():
    from ring_lightning.training.module import LongDocumentLM

    lm = LongDocumentLM(model={"preset": "tiny"}, attention={
        "variant": "distributed", "use_checkpoint_accumulation": True, "checkpoint_every_n_layers": 1})
    assert lm.model.config.checkpointing == "selective"
    assert lm.model.config.checkpoint_every_n_layers == 1
    assert LongDocumentLM(model={"preset": "tiny"}).model.config.checkpointing == "none"


def test_resume_with_more_steps_stretches_the_schedule():
    """A checkpoint's LR schedule does not override the resumed run's max_steps."""
    old = LongDocumentLM(model=TINY, warmup_steps=2, max_steps=10)
    opt_sched = old.configure_optimizers()
    sched = opt_sched["lr_scheduler"]["scheduler"]
    for _ in range(6):
        opt_sched["optimizer"].step()
        sched.step()
    checkpoint = {"lr_schedulers": [sched.state_dict()]}
    checkpoint["optimizer_states"] = [opt_sched["optimizer"].state_dict()]
    new = LongDocumentLM(model=TINY, warmup_steps=2, max_steps=100, lr=1e-4)
    new.on_load_checkpoint(checkpoint)
    resumed = new.configure_optimizers()["lr_scheduler"]["scheduler"]
    resumed.load_state_dict(checkpoint["lr_schedulers"][0])
    assert resumed.last_epoch == 6
    assert resumed.lr_lambdas[0].max_steps == 100  # the new end, not the checkpoint's 10
    assert resumed.base_lrs == [1e-4, 1e-4]  # the configured peak, not the checkpoint's 3e-4
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert all(g["initial_lr"] == 1e-4 and g["lr"] <= 1e-4 for g in groups)
