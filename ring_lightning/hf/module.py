"""HFCausalLM: a Hugging Face causal LM trained under RingStrategy, exported with save_pretrained.

::

    from ring_lightning.hf import HFCausalLM
    module = HFCausalLM("path/to/pretrained")            # or HFCausalLM(config={"model_type": "llama", ...})
    trainer = L.Trainer(strategy=RingStrategy(sequence_parallel_size=2), devices=2)
    trainer.fit(module, datamodule=LongDocumentDataModule(tokenizer=module.tokenizer_name, ...))

What it does for the user:

* loads the model with ``attn_implementation="ring_lightning"`` (attention.py) and gives every
  attention layer a ring core (``attention`` picks the variant and its fields);
* passes the batch's GLOBAL ``position_ids`` (the strategy adds them per shard) and packed
  ``document_ids`` to the model, ``use_cache=False``;
* labels: ring_lightning's batches hold labels aligned per position (``labels[t]`` is the target
  of ``input_ids[t]``, the README's label contract), so they go in as the model's own
  ``shift_labels=`` keyword: transformers' ``ForCausalLMLoss`` then neither shifts them again nor
  pairs tokens across shards. Its loss is this shard's mean over labelled tokens, which the
  strategy's ``loss_reduction="mean"`` scale turns into the sp=1 gradient (loss_contract.py);
  the logged ``train/loss`` is the sequence group's mean (one all-reduce of two numbers).
  With ``num_items_in_batch=True`` the model divides by the sequence group's count of labelled
  tokens instead (what the HF Trainer passes), and the loss goes through
  ``strategy.reduce_token_loss`` (exact logged loss, one more all-reduce);
* ``checkpointing``: the model's own activation checkpointing (non-reentrant), with offload;
* checkpoints are Lightning's; ``export_dir``: ``save_pretrained`` at the end of fit (rank 0),
  loadable by plain transformers (the attention implementation is not saved in the config); under
  ``RingFSDPStrategy`` every rank first gathers the sharded weights (``gathered_state_dict``).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Dict, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from ring_lightning.sequence import sharding
from ring_lightning.constants import DEFAULT_SEQUENCE_KEYS, IGNORE_INDEX
from ring_lightning.parallel.loss_contract import labels_follow_inputs
from ring_lightning.attention.documents import document_position_ids
from ring_lightning.training.schedule import WarmupCosine, keep_configured_schedule, optimizer_settings
from ring_lightning.training.module import _plain  # Hydra containers -> plain Python (one owner)

from .attention import IMPLEMENTATION, attach_ring_attention

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NOT_SET = object()




def build_hf_model(name_or_path: Optional[str], config: Optional[Dict[str, Any]], dtype: str = "float32",
                   trust_remote_code: bool = False):
    """A transformers causal LM on ``attn_implementation="ring_lightning"``.

    Args:
        name_or_path: a local ``save_pretrained`` directory or a hub name (``from_pretrained``).
        config: without ``name_or_path``: ``{"model_type": "llama" | "qwen2" | ..., **config fields}``,
            randomly initialised (``from_config``); with it: config fields to override.
        dtype: the weights' dtype (``float32``; mixed precision comes from the Trainer).

    Raises:
        ValueError: neither or an unknown ``model_type`` / ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not valid; valid values: {sorted(_DTYPES)}")
    fields = dict(config or {})
    if name_or_path:
        return AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=IMPLEMENTATION,
                                                    dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                    **fields)
    if "model_type" not in fields:
        raise ValueError("HFCausalLM needs model.name_or_path (a pretrained directory or hub name) or "
                         "model.config with a model_type (e.g. {model_type: llama, hidden_size: 256, ...})")
    model_type = fields.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        raise ValueError(f"model.config.model_type={model_type!r} is not a transformers model type ({err})") from None
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=IMPLEMENTATION, dtype=_DTYPES[dtype],
                                            trust_remote_code=trust_remote_code)


CHECKPOINTING = ("none", "full", "offload")


def enable_checkpointing(model, checkpointing: str, every_n_layers: int = 1) -> None:
    """The model's own activation checkpointing (non-reentrant: the ring's backward runs inside it).

    Raises:
        ValueError: an unknown mode, or one the installed transformers lacks.
    """
    if checkpointing not in CHECKPOINTING:
        hint = " (transformers recomputes whole decoder layers: use full)" if checkpointing == "selective" else ""
        raise ValueError(f"model.checkpointing={checkpointing!r} is not valid for a Hugging Face model{hint}; "
                         f"valid values: {CHECKPOINTING}")
    if checkpointing == "none":
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                              offload=checkpointing == "offload")
    elif checkpointing == "full" and every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"model.checkpointing={checkpointing!r} with checkpoint_every_n_layers={every_n_layers} "
                         f"needs a transformers with activation_checkpointing_enable; use checkpointing=full, "
                         f"checkpoint_every_n_layers=1")


class HFCausalLM(pl.LightningModule):
    """A transformers causal LM as a LightningModule for RingStrategy.

    Args:
        name_or_path: pretrained directory or hub name; or None with ``config``.
        config: ``{"model_type": ..., **fields}`` for a new model, or fields overriding the pretrained config.
        attention: ``{"variant": standard | hilbert | distributed | block_sparse, **RingAttentionConfig fields}``.
        tokenizer: the tokenizer the data should use; None: ``name_or_path`` (``"byte"`` when building from a config).
        dtype: weights' dtype.
        checkpointing: activation checkpointing through the model's own mechanism: ``none``, ``full``
            (recompute decoder layers in backward), ``offload`` (``full`` with the saved layer inputs in
            pinned host memory; transformers >= 5.x's ``activation_checkpointing_enable(offload=True)``).
        checkpoint_every_n_layers: with checkpointing: layers 0, n, 2n, ... are recomputed.
        num_items_in_batch: divide the loss by the sequence group's labelled-token count (the HF
            Trainer's convention) instead of taking each shard's mean.
        lr, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio: AdamW with warm-up + cosine.
        sequence_keys: batch entries the strategy shards along the sequence.
        document_mask: pass the batch's ``document_ids`` (packed documents) to the attention.
        restart_positions_per_document: positions restart at 0 in every document (before sharding).
        export_dir: ``save_pretrained`` here (and the tokenizer, when it loads) at the end of fit.
        trust_remote_code: passed to transformers.

    Raises:
        ValueError: an argument outside its valid values (the message names it).
    """

    is_causal = True  # read by RingStrategy to choose the layout

    def __init__(
        self,
        name_or_path: Optional[str] = None,
        config: Optional[Dict[str, Any]] = None,
        attention: Optional[Dict[str, Any]] = None,
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        checkpointing: str = "none",
        checkpoint_every_n_layers: int = 1,
        num_items_in_batch: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 10,
        max_steps: Optional[int] = None,
        min_lr_ratio: float = 0.1,
        sequence_keys: Sequence[str] = DEFAULT_SEQUENCE_KEYS,
        document_mask: bool = True,
        restart_positions_per_document: bool = False,
        export_dir: Optional[str] = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from ring_lightning.training.module import LongDocumentLM  # the same attention-config validation

        self.lr, self.weight_decay, self.betas, self.warmup_steps, self.max_steps, self.min_lr_ratio = \
            optimizer_settings(lr, weight_decay, _plain(betas), warmup_steps, max_steps, min_lr_ratio)
        variant, attention_config = LongDocumentLM._attention_config(_plain(attention))
        self.model = build_hf_model(name_or_path, _plain(config), dtype, trust_remote_code)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps a submodule's mode as found
        self.num_ring_cores = attach_ring_attention(self.model, variant, attention_config)
        if self.num_ring_cores == 0:
            raise ValueError(f"{type(self.model).__name__} has no attention layer of transformers' AttentionInterface "
                             f"kind (layer_idx, scaling, config): ring_lightning cannot drive its attention")
        enable_checkpointing(self.model, checkpointing, int(checkpoint_every_n_layers))
        self.tokenizer_name = tokenizer or name_or_path or "byte"
        self.num_items_in_batch = bool(num_items_in_batch)
        self.sequence_keys = tuple(_plain(sequence_keys))
        self.document_mask, self.restart_positions = bool(document_mask), bool(restart_positions_per_document)
        self.export_dir = export_dir
        self._previous_sharding: Any = _NOT_SET
        self._check_loss_mask = self._check_labels = True
        self._tput = collections.deque(maxlen=21)
        self._tokens_seen = 0
        self._val_stats: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ batches
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Before sharding, so a document that starts on another rank still restarts at 0 here.
        if self.restart_positions and isinstance(batch, dict) and "document_ids" in batch \
                and "position_ids" not in batch:
            batch = {**batch, "position_ids": document_position_ids(batch["document_ids"])}
        return batch

    def model_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The model's keyword arguments for a (sharded) batch: ids, global positions, documents,
        aligned labels as ``shift_labels`` (so the model's loss does not shift them again)."""
        ids = batch["input_ids"]
        positions = batch.get("position_ids")
        if positions is None:  # no strategy sharded this batch: one device
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        inputs: Dict[str, Any] = {"input_ids": ids, "position_ids": positions, "use_cache": False}
        if self.document_mask and isinstance(batch.get("document_ids"), torch.Tensor):
            inputs["document_ids"] = batch["document_ids"]
        if "labels" in batch:
            # contiguous: a contiguous-layout shard is a narrow view, and the model's loss calls .view(-1)
            inputs["labels"] = inputs["shift_labels"] = batch["labels"].contiguous()
            if self._check_labels:  # once (comparisons synchronise): labels aligned per position
                self._check_labels = False
                if labels_follow_inputs(batch, "labels", IGNORE_INDEX):
                    raise ValueError(
                        "batch['labels'] equals batch['input_ids'] (the Hugging Face convention, shifted inside the "
                        "model); HFCausalLM passes labels as the model's shift_labels, aligned per position "
                        "(labels[t] = input_ids[t + 1]). Shift them in the data, or let the strategy shift them "
                        "before sharding: RingStrategy(shift_labels=True) (train.py: strategy.shift_labels=true)")
            mask = batch.get("loss_mask")
            if isinstance(mask, torch.Tensor) and self._check_loss_mask:
                self._check_loss_mask = False
                if not torch.equal(mask.float(), (batch["labels"] != IGNORE_INDEX).float()):
                    raise ValueError("HFCausalLM trains on labels != -100 (the model's own loss); this batch's "
                                     "loss_mask weights tokens otherwise: set the labels of unweighted positions "
                                     "to -100, or use LongDocumentLM (its compute_loss applies loss_mask)")
        return inputs

    def forward(self, **inputs: Any):
        return self.model(**inputs)

    def _sp(self):
        strategy = self._trainer.strategy if self._trainer is not None else None
        sp = getattr(strategy, "sequence_parallel_size", 1)
        return strategy, sp, (strategy.sp_group if sp > 1 else None)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = self.model_inputs(batch)
        strategy, sp, group = self._sp()
        n_local = (batch["labels"] != IGNORE_INDEX).sum()
        if not self.num_items_in_batch:
            loss = self(**inputs).loss  # this shard's mean; RingStrategy scales it (loss_contract.py)
            mean_loss = loss.detach()
            if group is not None:  # logged: the group's mean over labelled tokens (one small all-reduce)
                stats = torch.stack([torch.where(n_local > 0, mean_loss * n_local, 0.0), n_local.to(loss.dtype)])
                dist.all_reduce(stats, group=group)
                mean_loss = stats[0] / stats[1].clamp(min=1)
        else:
            n_group = n_local.clone()
            if group is not None:
                dist.all_reduce(n_group, group=group)
            n_group = n_group.clamp(min=1)  # a group with no labelled token: a zero loss, not 0/0
            inputs["num_items_in_batch"] = n_group  # the model returns this shard's sum / n_group
            loss_sum = self(**inputs).loss * n_group
            if hasattr(strategy, "reduce_token_loss"):
                loss, mean_loss = strategy.reduce_token_loss(loss_sum, n_local)  # tells backward not to rescale
            else:
                loss = mean_loss = loss_sum / n_group.clamp(min=1)
        self.log("train/loss", mean_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs = self.model_inputs(batch)
        labels = batch["labels"]
        inputs["num_items_in_batch"] = torch.ones((), device=labels.device)  # the model's loss is then a sum
        loss_sum = self(**inputs).loss.detach().double()
        stats = torch.stack([loss_sum, (labels != IGNORE_INDEX).sum().double()])
        self._val_stats = stats if self._val_stats is None else self._val_stats + stats

    def on_validation_epoch_start(self) -> None:
        self._val_stats = None

    def on_validation_epoch_end(self) -> None:
        stats = self._val_stats if self._val_stats is not None else torch.zeros(2, dtype=torch.float64,
                                                                                 device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")  # every token once, whatever the split
        loss = (stats[0] / stats[1].clamp(min=1)).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=30)), sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self._tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self._tput.append((time.perf_counter(), self._tokens_seen))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if len(self._tput) >= 2:
            (t0, n0), (t1, n1) = self._tput[0], self._tput[-1]
            self.log("perf/tokens_per_s", (n1 - n0) / max(t1 - t0, 1e-9), prog_bar=True)
        if self.device.type == "cuda" and batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("perf/peak_memory_mb", torch.cuda.max_memory_allocated(self.device) / 2**20)  # this rank's

    # ------------------------------------------------------------------ setup, optimizer, export
    def setup(self, stage: str) -> None:
        from ring_lightning.training.module import _is_ring_strategy

        strategy = self.trainer.strategy
        if not _is_ring_strategy(strategy) and self._previous_sharding is _NOT_SET:
            # Plain DDP or one device splits no sequence (see LongDocumentLM.setup).
            self._previous_sharding = sharding.set_default_sequence_sharding(sharding.NOTHING_SPLIT)
        vocab = getattr(getattr(self.trainer, "datamodule", None), "vocab_size", None)
        model_vocab = self.model.config.get_text_config().vocab_size
        if isinstance(vocab, int) and vocab > model_vocab:
            raise ValueError(f"the data's tokenizer has {vocab} ids but the model embeds {model_vocab}: use the "
                             f"model's tokenizer (data.tokenizer={self.tokenizer_name!r}) or a larger "
                             f"model.config.vocab_size")

    def teardown(self, stage: str) -> None:
        if self._previous_sharding is not _NOT_SET:
            sharding.set_default_sequence_sharding(self._previous_sharding)
            self._previous_sharding = _NOT_SET

    def configure_optimizers(self):
        """AdamW (matrices decayed, vectors not) and a per-step warm-up + cosine LambdaLR."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, foreach=True)
        total = self.max_steps if self.max_steps is not None else float(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(self.warmup_steps, total,
                                                                              self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        keep_configured_schedule(checkpoint, self.lr)

    def on_fit_end(self) -> None:
        if not self.export_dir:
            return
        state = self.gathered_state_dict()  # every rank: a collective under FSDP2
        if self.trainer.is_global_zero:
            self.export(self.export_dir, state)

    def gathered_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The Hugging Face model's whole state dict (its own keys, on the host) when FSDP2 shards
        it (``RingFSDPStrategy``: the parameters are DTensor shards), or None when every rank holds
        the whole parameters (DDP, one device). Under FSDP2 every rank must call it (it gathers)."""
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for p in self.parameters()):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # From the root (this LightningModule), which FSDP2 shards with the blocks inside it.
        full = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name[len("model."):]: t for name, t in full.items() if name.startswith("model.")}

    def export(self, directory: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
        """``save_pretrained`` the model (and the tokenizer, when ``tokenizer_name`` loads) to ``directory``;
        ``state_dict``: the whole weights to save instead of the model's own (``gathered_state_dict``
        under FSDP2, whose parameters are shards).

        The saved config names no attention implementation, so plain transformers loads it with its
        default (``sdpa``) and computes the same logits.
        """
        self.model.save_pretrained(directory, state_dict=state_dict)
        if self.tokenizer_name != "byte":
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(self.tokenizer_name).save_pretrained(directory)
            except (OSError, ValueError):  # a model built from a config has no tokenizer to copy
                pass
        return os.path.abspath(directory)
