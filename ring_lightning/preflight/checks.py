"""The checks that need only the composed config (and the data module): the entry of train.py's pre-flight."""

from __future__ import annotations

import os
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from ring_lightning.preflight import machine
from ring_lightning.preflight.errors import ConfigError, is_launching_process
from ring_lightning.preflight.memory import check_memory
from ring_lightning.preflight.shape import check_sequence_length, parallel_dims


def clamp_schedule(cfg: DictConfig) -> List[str]:
    """A validation interval past ``trainer.max_steps`` becomes ``max_steps`` (so a shortened run
    validates, at its end); returns the notes to print."""
    trainer = cfg.trainer
    interval, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    if isinstance(interval, int) and isinstance(max_steps, int) and 0 < max_steps < interval:
        trainer.val_check_interval = max_steps
        return [f"note: trainer.val_check_interval={interval} is past trainer.max_steps={max_steps}: "
                f"validating at step {max_steps} instead"]
    return []


def check_config(cfg: DictConfig) -> List[str]:
    """Every check that needs only the composed config. Returns notes to print; raises ConfigError."""
    per_node = machine.devices_per_node(cfg.trainer)
    dims = parallel_dims(cfg, per_node)  # the shape, built once: the later checks ask it
    check_sequence_length(cfg, per_node, dims)
    return check_memory(cfg, per_node, dims=dims) + machine.cpu_oversubscription(cfg.trainer, per_node) + clamp_schedule(cfg)


def check_data_source(datamodule: Any) -> None:
    """A source that must be fetched (``data=hub``) and is not cached yet: ask it once now.
    Local files (``data=files``) not cached yet: surveyed (``sources.corpus_notes_and_error``):
    binary files and hidden entries named, an empty or too-short corpus refused."""
    source = getattr(datamodule, "text_source", None)
    if hasattr(source, "survey") and not os.path.isdir(datamodule._cache_path()):
        from ring_lightning.data.sources import corpus_notes_and_error

        notes, error = corpus_notes_and_error(source.survey(), datamodule.seq_len, datamodule.max_tokens,
                                              byte_tokens=datamodule.tokenizer_name == "byte")
        if notes and is_launching_process():
            print("\n".join(notes), flush=True)
        if error:
            raise ConfigError(error)
    if not hasattr(source, "check_reachable"):
        return
    if os.path.isdir(datamodule._cache_path()):
        return  # packed windows from an earlier run: no network needed
    source.check_reachable()


# ---------------------------------------------------------------------- vocabulary
def check_vocab_size(cfg: DictConfig, datamodule: Any) -> List[str]:
    """``model.vocab_size`` against the data's tokenizer, before the model is built.

    By default ``model.vocab_size`` follows ``data.tokenizer`` (hydra_presets.py: the tokenizer's
    ids rounded up to a multiple of 64); an explicit value smaller than the tokenizer's ids would
    index past the embedding, so it is refused naming the override and the minimum. Returns a
    note naming the size when it was derived from a tokenizer other than bytes.
    """
    model = cfg.get("model")
    needed = getattr(datamodule, "vocab_size", None)  # loads the tokenizer: its errors are user errors
    if not isinstance(model, DictConfig) or "vocab_size" not in model or not isinstance(needed, int):
        return []  # a model without our vocabulary field (e.g. a Hugging Face model) checks its own
    derived = OmegaConf.is_interpolation(model, "vocab_size")
    value = model.vocab_size
    tokenizer = cfg.data.get("tokenizer", "byte")
    if isinstance(value, int) and not isinstance(value, bool) and value < needed:
        padded = getattr(datamodule, "model_vocab_size", needed)
        raise ConfigError(
            f"model.vocab_size={value} is smaller than the vocabulary of data.tokenizer={tokenizer} ({needed} ids): "
            f"set model.vocab_size >= {needed}, or drop the override: model.vocab_size follows data.tokenizer "
            f"by default ({padded} for this one)")
    if derived and tokenizer != "byte":
        return [f"note: model.vocab_size={value} from data.tokenizer={tokenizer} ({needed} ids, rounded up to a "
                f"multiple of 64)"]
    return []
