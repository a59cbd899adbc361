"""LongDocumentLM: the LightningModule that trains a LongDocTransformer, built to be subclassed.

Override points (each a method with a docstring below):

* ``build_attention(layer_idx)``: the attention core of one layer (default: the ring
  attention variant named in ``attention``).
* ``prepare_batch(batch)``: anything done to a batch before the forward pass (default:
  add ``position_ids = arange`` when absent; under RingStrategy they are already the
  shard's GLOBAL positions).
* ``compute_loss(logits, batch) -> (loss_sum, num_tokens)``: the SUM of token losses of
  this rank's tokens and how many tokens it covers. Return sums, not means: the strategy
  turns them into a loss whose gradient matches a single device however the sequence is
  split (a rank may hold no labelled token at all).
* ``configure_optimizers()``: AdamW with decay / no-decay groups, linear warm-up and
  cosine decay to ``min_lr_ratio * lr``, stepped every optimizer step.

Example (tested in tests/unit/training/test_module.py)::

    class LabelSmoothingLM(LongDocumentLM):
        def compute_loss(self, logits, batch):
            labels = batch["labels"]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=-100, label_smoothing=0.1, reduction="sum")
            return loss, (labels != -100).sum()

Logged: train/loss, train/ppl (exact: the sequence group's per-token mean), val/loss, val/ppl
(token-weighted over all ranks), lr (the rate the optimizer used at that step), step (optimizer
steps done; run_report.StepMetric), perf/tokens_per_s (global), perf/peak_memory_mb (max over
ranks, and per rank), on CUDA perf/tflops_per_gpu and perf/mfu (model FLOPs of the attention's
allowed pairs on each whole batch: ``attention_pairs`` / ``train_flops``) and
perf/dense_equivalent_tflops_per_gpu, ring/{total,compute,comm}_ms,
ring/{comm,all_to_all}_volume_mb (first ring attention module, last call),
ring/compression_ratio, and val/<task metric> (val/retrieval_acc for the retrieval task).
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import asdict, is_dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ring_lightning.sequence import sharding
from ring_lightning.constants import DEFAULT_SEQUENCE_KEYS, IGNORE_INDEX
from ring_lightning.models.loss import linear_cross_entropy
from ring_lightning.attention.documents import document_position_ids
from ring_lightning.models.model import LongDocTransformer, ModelConfig, default_position_ids
from ring_lightning.training.schedule import WarmupCosine, keep_configured_schedule, optimizer_settings  # noqa: F401 (WarmupCosine re-exported)
from ring_lightning.training.training_metrics import TrainingMetrics

def _plain(value: Any) -> Any:
    """Hydra DictConfig/ListConfig (or a dataclass) -> plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


class LongDocumentLM(TrainingMetrics, pl.LightningModule):
    """Next-token language modelling on long documents with ring attention.

    Args:
        model: a ModelConfig, a mapping of its fields, or ``{"preset": "tiny", ...}``.
        attention: ``{"variant": standard | hilbert | distributed | block_sparse, **fields}``
            where fields are RingAttentionConfig fields (e.g. segment_lengths, dilation_rates).
        lr: peak learning rate.
        weight_decay: AdamW decay of matrices (norm weights are never decayed).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        max_steps: end of the cosine decay; None = the trainer's estimated stepping batches.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        sequence_keys: batch entries the strategy shards along the sequence (dim 1).
        throughput_window: steps averaged into perf/tokens_per_s.
        compile: ``torch.compile`` each block's work around its attention core (norms,
            projections, rotary, SwiGLU) on CUDA; the attention core stays eager.
        loss_chunk_tokens: the LM head and cross-entropy run in chunks of this many tokens
            (``ring_lightning.models.loss.linear_cross_entropy``), never holding the (B, T, V)
            logits; None = about 4 GiB of float32 logits per chunk, 0 = plain logits. A
            subclass overriding ``compute_loss`` or ``forward`` gets the logits.

    Raises:
        ValueError: an argument outside its valid values (the message names it).
    """

    #: Read by RingStrategy to choose the layout (zigzag balances causal work).
    is_causal = True

    def __init__(
        self,
        model: Union[ModelConfig, Dict[str, Any], None] = None,
        attention: Optional[Dict[str, Any]] = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: Optional[int] = None,
        min_lr_ratio: float = 0.1,
        sequence_keys: Sequence[str] = DEFAULT_SEQUENCE_KEYS,
        throughput_window: int = 20,
        compile: bool = False,
        document_mask: bool = True,
        restart_positions_per_document: bool = False,
        loss_chunk_tokens: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.weight_decay, self.betas, self.warmup_steps, self.max_steps, self.min_lr_ratio = \
            optimizer_settings(lr, weight_decay, _plain(betas), warmup_steps, max_steps, min_lr_ratio)
        if throughput_window < 1:
            raise ValueError(f"throughput_window must be >= 1, got {throughput_window}")
        if loss_chunk_tokens is not None and (not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 0):
            raise ValueError(f"module.loss_chunk_tokens must be null (auto), 0 (plain logits) or a positive "
                             f"number of tokens, got {loss_chunk_tokens!r}")
        self.loss_chunk_tokens = loss_chunk_tokens
        self.sequence_keys = tuple(_plain(sequence_keys))
        self.attention_variant, self.attention_config = self._attention_config(_plain(attention))
        self.model = LongDocTransformer(self._checkpointing_from_attention(ModelConfig.from_any(_plain(model))),
                                        self.build_attention)
        self.compile_blocks, self._compiled = bool(compile), False
        # packed documents: the batch's document_ids confine attention (and optionally RoPE)
        self.document_mask, self.restart_positions = bool(document_mask), bool(restart_positions_per_document)
        self._ring_modules: List[nn.Module] = []
        self._previous_sharding: Any = _NOT_SET  # the default sharding before setup() under DDP
        # (time, cumulative global tokens, cumulative model FLOPs of one GPU, the same with dense attention)
        self._tput = collections.deque(maxlen=throughput_window + 1)
        self._tokens_seen, self._flops_seen, self._dense_flops_seen = 0, 0.0, 0.0
        self._batch_pairs: Optional[float] = None  # attention pairs of the next training batch, counted unsharded
        self._lr_used: Optional[float] = None
        self._val_stats: Optional[torch.Tensor] = None

    def _checkpointing_from_attention(self, config: ModelConfig) -> ModelConfig:
        """The attention config's checkpointing request (its edge, ``attention.config_adapter``, decides
        when it asks) turns on the model's selective activation checkpointing: the attention cannot
        checkpoint the layers around it; the model can. An explicit model setting wins."""
        from ring_lightning.attention.config_adapter import checkpointing_request

        request = checkpointing_request(self.attention_variant, self.attention_config)
        if request is None or config.checkpointing != "none":
            return config
        return dataclasses.replace(config, checkpointing="selective", checkpoint_every_n_layers=request.every_n_layers)

    @staticmethod
    def _attention_config(attention: Optional[Dict[str, Any]]):
        from ring_lightning.attention import RingAttentionConfig
        from ring_lightning.attention.config import VARIANTS

        fields = dict(attention or {})
        variant = fields.pop("variant", "standard")
        if variant not in VARIANTS:
            raise ValueError(f"attention.variant={variant!r} is not valid; valid values: {VARIANTS}")
        unknown = sorted(set(fields) - set(RingAttentionConfig.field_names()))
        if unknown:
            raise ValueError(
                f"attention.{unknown[0]} is not a RingAttentionConfig field; valid fields: "
                f"['variant'] + {RingAttentionConfig.field_names()}"
            )
        return variant, RingAttentionConfig(**fields)

    # ------------------------------------------------------------------ override points
    def build_attention(self, layer_idx: int) -> nn.Module:
        """The attention core of layer ``layer_idx`` (called once per layer in ``__init__``).

        Returns:
            A module called as ``core(q, k, v, is_causal=True, already_split=True)``, plus
            ``document_ids=`` when the batch has packed documents (``document_mask``);
            by default ``create_ring_attention(variant, config)``.
        """
        from ring_lightning.attention import create_ring_attention

        return create_ring_attention(self.attention_variant, config=self.attention_config)

    def prepare_batch(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Add ``position_ids`` (B, T) = arange when absent (RingStrategy adds global ones).

        Args:
            batch: dict with at least ``input_ids`` and ``labels`` (B, T).

        Returns:
            A dict with ``position_ids`` as well.
        """
        if "position_ids" not in batch:
            batch = {**batch, "position_ids": default_position_ids(batch["input_ids"])}
        return batch

    def document_ids(self, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The batch's ``document_ids`` (B, T) when ``document_mask`` is on, else None."""
        return batch.get("document_ids") if self.document_mask else None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Before any sharding (the strategy shards after the transfer hooks), so a document
        # that starts on another rank still restarts at 0 on this one.
        if self.restart_positions and isinstance(batch, dict) and "document_ids" in batch \
                and "position_ids" not in batch:
            batch = {**batch, "position_ids": document_position_ids(batch["document_ids"])}
        if self._trainer is not None and self.trainer.training and isinstance(batch, dict):
            self._batch_pairs = self.attention_pairs(batch)  # whole sequences, on the host: no sync
        return batch

    def compute_loss(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over this rank's valid tokens.

        Args:
            logits: (B, T, V).
            batch: ``labels`` (B, T) with -100 where ignored; optional ``loss_mask`` (B, T)
                weighting each token.

        Returns:
            ``(loss_sum, num_tokens)``: scalars; num_tokens may be 0 on a rank.
        """
        labels = batch["labels"]
        # float32 logits: a bf16 log-softmax over a large vocabulary loses the small terms.
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
        weight = (labels.flatten() != IGNORE_INDEX).float()
        if "loss_mask" in batch:
            weight = weight * batch["loss_mask"].flatten().float()
        return (ce * weight).sum(), weight.sum()

    def configure_optimizers(self):
        """AdamW (matrices decayed, vectors not) and a per-step warm-up + cosine LambdaLR."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # foreach, not fused: Lightning refuses gradient clipping with a fused optimizer under
        # mixed precision (it would unscale fp16 gradients itself), and the fused step's
        # saving is a few ms per step (benchmarks/bench_model.py measures both).
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, foreach=True)
        total = self.max_steps if self.max_steps is not None else float(self.trainer.estimated_stepping_batches)
        schedule = WarmupCosine(self.warmup_steps, total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -------------------------------------------------------------------------- steps
    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) ids and GLOBAL positions -> (B, T, V) logits."""
        return self.model(input_ids, position_ids, document_ids)

    def reduce_loss(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss_to_backprop, mean_loss_for_logging)`` through the strategy when it knows how."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "reduce_token_loss"):
            return strategy.reduce_token_loss(loss_sum, num_tokens)
        loss = loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)
        return loss, loss.detach()

    def loss_sums(self, batch: Dict[str, torch.Tensor], need_logits: bool = False):
        """``(loss_sum, num_tokens, logits or None)`` of this rank's tokens.

        The chunked head + cross-entropy (no logits) unless ``loss_chunk_tokens=0``, the
        logits are needed, or a subclass overrides ``compute_loss`` / ``forward``.
        """
        inputs = (batch["input_ids"], batch["position_ids"], self.document_ids(batch))
        own = type(self).compute_loss is LongDocumentLM.compute_loss and type(self).forward is LongDocumentLM.forward
        if self.loss_chunk_tokens == 0 or need_logits or not own:
            logits = self(*inputs)
            return (*self.compute_loss(logits, batch), logits)
        # the final norm runs per chunk inside the loss: its float32 activations never span the shard
        loss_sum, num_tokens = linear_cross_entropy(
            self.model.hidden_states(*inputs, final_norm=False), self.model.output.weight, batch["labels"],
            loss_weight=batch.get("loss_mask"), chunk_tokens=self.loss_chunk_tokens, pre_head=self.model.norm)
        return loss_sum, num_tokens, None

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = self.prepare_batch(batch)
        loss_sum, num_tokens, _ = self.loss_sums(batch)
        loss, mean_loss = self.reduce_loss(loss_sum, num_tokens)
        B = batch["input_ids"].shape[0]
        self.log("train/loss", mean_loss, prog_bar=True, batch_size=B)
        self.log("train/ppl", torch.exp(mean_loss.float().clamp(max=30)), batch_size=B)
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        batch = self.prepare_batch(batch)
        # The task (if the data has one) owns its metric; plain LM data counts nothing.
        metric_fn = getattr(getattr(self._trainer, "datamodule", None), "task_metric_fn", None)
        loss_sum, num_tokens, logits = self.loss_sums(batch, need_logits=metric_fn is not None)
        if metric_fn is not None:
            correct, total = metric_fn(logits, batch["labels"])
        else:
            correct = total = torch.zeros((), device=loss_sum.device)
        stats = torch.stack([loss_sum.detach().double(), torch.as_tensor(num_tokens).double().to(loss_sum.device),
                             correct.double(), total.double()])
        self._val_stats = stats if self._val_stats is None else self._val_stats + stats

    def on_validation_epoch_start(self) -> None:
        self._val_stats = None

    def on_validation_epoch_end(self) -> None:
        stats = self._val_stats
        if stats is None:  # no validation batch on this rank
            stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        # Sums over every rank: each token is counted once whatever the (dp, sp) split.
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        loss = (stats[0] / stats[1].clamp(min=1)).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # identical on ranks: sync is a no-op mean
        self.log("val/ppl", torch.exp(loss.clamp(max=30)), sync_dist=True)
        metric = getattr(getattr(self.trainer, "datamodule", None), "task_metric", None)
        if metric is not None:
            self.log(f"val/{metric}", (stats[2] / stats[3].clamp(min=1)).float(), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        from ring_lightning.attention import ring_attention_modules

        self._ring_modules = ring_attention_modules(self.model)
        strategy = self.trainer.strategy
        if not _is_ring_strategy(strategy) and self._previous_sharding is _NOT_SET:
            # Plain DDP (or one device) splits no sequence: say so, or the attention would take
            # the initialised default group (the data-parallel world) as its sequence group.
            self._previous_sharding = sharding.set_default_sequence_sharding(sharding.NOTHING_SPLIT)
        # setup() runs before the strategy moves the model: ask the strategy for the device.
        on_cuda = strategy.root_device.type == "cuda"
        if self.compile_blocks and on_cuda and stage == "fit" and not self._compiled:
            self.model.compile_blocks()
            self._compiled = True
        datamodule = getattr(self.trainer, "datamodule", None)
        vocab = getattr(datamodule, "vocab_size", None)
        if isinstance(vocab, int) and vocab > self.model.config.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.model.config.vocab_size} is smaller than the data's vocabulary "
                f"({vocab} ids); set model.vocab_size >= {vocab}"
            )

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        keep_configured_schedule(checkpoint, self.lr)  # a raised max_steps stretches the cosine

    def teardown(self, stage: str) -> None:
        if self._previous_sharding is not _NOT_SET:
            sharding.set_default_sequence_sharding(self._previous_sharding)
            self._previous_sharding = _NOT_SET

_NOT_SET = object()


def _is_ring_strategy(strategy: Any) -> bool:
    # A sequence-parallel strategy has a parallel shape (ring_lightning/sequence/dims.py) and
    # shards batches: asked of its class, so the module imports no strategy.
    return getattr(type(strategy), "parallel_dims", None) is not None and hasattr(strategy, "shard_batch")
