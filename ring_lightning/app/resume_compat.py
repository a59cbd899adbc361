"""Can this checkpoint continue under this config? Every difference classed before a weight loads.

Each checkpoint train.py writes records the composed config as flat keys (``ConfigRecord``:
``train.flat_config``, the same keys ``ConfigAgreement`` compares across ranks). On resume,
``check_resume`` reads that record with a ``weights_only`` load (memory-mapped: no tensor is
read) in the launching process, before any rank starts, and classes every key that differs:

* **refused** (``REFUSED``): keys that change the weights' shapes or what they mean: the model's
  sizes and head split, the vocabulary (``model.vocab_size``, ``data.tokenizer``), the attention
  variant and its pattern, the seeds of the data order and of the random streams, the gradient
  compression method. Resuming under them would fail with a size mismatch on every rank or,
  worse, read the same tensors under another meaning (4 heads of 16 read as 8 of 8). The
  message names each key with both values and what to do: a new run, or the checkpoint's
  weights alone in a new run directory (``ckpt_path=<file> resume_weights_only=true``: a fresh
  optimizer and schedule from step 0, possible where the shapes agree);
* **accepted with a note** (everything else: ``trainer.max_steps``, ``module.lr``,
  ``data.batch_size``, ``data.paths``, logging, ...): one line each, saying what it changes;
* **ignored**: the run's own paths and the resume switches (``IGNORED``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl

CONFIG_KEY = "ring_lightning_config"  #: checkpoint entry: the composed config, {"group.key": value}
WEIGHTS_ONLY_OVERRIDE = "resume_weights_only"

# No effect on the trained weights: activation checkpointing and the memory options (the same
# numbers, recomputed or on the host), and the init of weights that are loaded anyway.
_MODEL_FREE = ("checkpointing", "checkpoint_every_n_layers", "offload_activations", "blocks_per_checkpoint",
               "mlp_tile_tokens", "init_std")
_PATTERN = ("variant", "segment_lengths", "dilation_rates", "scale", "use_hilbert", "hilbert_curve_level",
            "grid_shape", "grid_window", "grid_order", "block_size", "sparsity_ratio", "sparse_pattern",
            "sparse_seed", "compression_method")
#: (key pattern, why a change cannot continue) in the order they are checked
REFUSED: Tuple[Tuple[str, str], ...] = (
    *((f"{prefix}{name}", "the attention pattern the weights were trained under")
      for prefix in ("variant.", "module.attention.") for name in _PATTERN),
    ("model.*", "the model's shapes or the meaning of its weights (sizes, head split, vocabulary, positions)"),
    ("module.model.*", "the model's shapes or the meaning of its weights (sizes, head split, vocabulary, positions)"),
    ("data.tokenizer", "the vocabulary: token ids would mean other text"),
    ("seed", "the seed of the data order and of the random streams the checkpoint continues"),
    ("data.seed", "the seed of the data order the checkpoint's position belongs to"),
    ("strategy.compression", "the gradient-compression method (its state would not carry over)"),
)
#: keys that differ between runs by design (the run's paths, the resume switches)
IGNORED = ("ckpt_path", "resume", WEIGHTS_ONLY_OVERRIDE, "run_name", "paths.*", "metrics_file.save_dir",
           "trainer.default_root_dir", "callbacks.model_checkpoint.dirpath", "logger.*.save_dir", "data.cache_dir",
           "hydra.*")
#: (key pattern, the effect of a change) for the notes; the first match wins
EFFECTS: Tuple[Tuple[str, str], ...] = (
    ("trainer.max_steps", "the run now ends there; the LR schedule stretches to it"),
    ("module.max_steps", "the LR schedule's length"),
    ("module.*", "the optimizer and the loss continue with the new value"),
    ("data.*", "other windows or batches: the data position restarts its epoch if they no longer match"),
    ("trainer.devices", "another number of ranks: weights, optimizer and data order carry over"),
    ("trainer.*", "the trainer continues with the new value"),
    ("strategy.*", "the strategy continues with the new value"),
    ("logger.*", "logging only"),
    ("callbacks.*", "callbacks only"),
    ("*", "taken as given"),
)


class ConfigRecord(pl.Callback):
    """Writes the composed config (flat keys, plain values) into every checkpoint."""

    def __init__(self, flat: Dict[str, Any]) -> None:
        from ring_lightning.training.checkpoint_io import plain

        self.flat = plain(dict(flat))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CONFIG_KEY] = self.flat


def _match(key: str, patterns) -> Optional[str]:
    for entry in patterns:
        pattern, value = entry if isinstance(entry, tuple) else (entry, entry)
        if fnmatch.fnmatchcase(key, pattern):
            return value
    return None


def _refusal(key: str) -> Optional[str]:
    if key.startswith(("model.", "module.model.")) and key.rsplit(".", 1)[-1] in _MODEL_FREE:
        return None
    return _match(key, REFUSED)


_MISSING = object()
_MIRRORS = (("module.model.", "model."), ("module.attention.", "variant."))  # the module's copy of a group


def _mirror(key: str) -> Optional[str]:
    """``model.dim`` for ``module.model.dim``: the group the user overrides, shown instead of its copy."""
    for copy, group in _MIRRORS:
        if key.startswith(copy):
            return group + key[len(copy):]
    return None


def _target_name(path: str) -> str:
    """Where the object a ``_target_`` names is defined: a checkpoint of before the packages names
    the old flat paths (``ring_lightning.module.LongDocumentLM``), aliases of the same objects until 0.3."""
    from hydra.utils import get_object

    try:
        obj = get_object(path)
    except Exception:  # noqa: BLE001 (hydra wraps the import's error): not ours to judge, the text stays
        return path
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def _canonical(key: str, value: Any) -> Any:
    """``value`` with every ring_lightning ``_target_`` in it (the key's own, or in a list of nodes) by definition."""
    if isinstance(value, str) and key.rsplit(".", 1)[-1] == "_target_" and value.startswith("ring_lightning."):
        return _target_name(value)
    if isinstance(value, list):
        return [_canonical(key, v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(k, v) for k, v in value.items()}
    return value


def classify(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(refused, notes): one line per differing key, ``key old -> new (why / effect)``."""
    refused, notes = [], []
    differ = {k for k in set(saved) | set(current) if saved.get(k, _MISSING) != current.get(k, _MISSING)
              and _canonical(k, saved.get(k, _MISSING)) != _canonical(k, current.get(k, _MISSING))}
    for key in sorted(differ):
        old, new = saved.get(key, _MISSING), current.get(key, _MISSING)
        if _match(key, IGNORED) or _mirror(key) in differ:
            continue
        shown = (f"{key} {'(unset)' if old is _MISSING else repr(old)} -> "
                 f"{'(unset)' if new is _MISSING else repr(new)}")
        why = _refusal(key)
        if why is not None:
            refused.append(f"{shown} ({why})")
        else:
            notes.append(f"resume: {shown}: {_match(key, EFFECTS)}")
    return refused, notes


def saved_config(path: str) -> Optional[Dict[str, Any]]:
    """The config a checkpoint (file or folder) recorded (None for a checkpoint written before it was recorded)."""
    from ring_lightning.training.checkpoint_io import checkpoint_metadata

    return (checkpoint_metadata(path) or {}).get(CONFIG_KEY)


def check_resume(path: str, current: Dict[str, Any], weights_only: bool) -> List[str]:
    """Notes for a resume of ``path`` under ``current`` (flat config).

    Raises:
        ConfigError: a key in ``REFUSED`` differs (and ``resume_weights_only`` is not set); the
            message names each key, both values and what to do.
    """
    from ring_lightning.preflight import ConfigError

    saved = saved_config(path)
    if saved is None:
        return [f"resume: {path} records no config (written by an earlier version): not compared"]
    refused, notes = classify(saved, current)
    if refused and not weights_only:
        raise ConfigError(
            f"the checkpoint {path} cannot continue under this config; these keys changed:\n    "
            + "\n    ".join(refused)
            + "\n  Either resume with the checkpoint's values for them, or start a new run: another "
              "hydra.run.dir without resume=true, or its weights alone (fresh optimizer and schedule, "
              f"step 0; the tensor shapes must agree) in a new run dir: hydra.run.dir=<new dir> "
              f"ckpt_path={path} {WEIGHTS_ONLY_OVERRIDE}=true")
    if weights_only:  # nothing but the weights continues: the other differences have no effect to note
        return [f"{WEIGHTS_ONLY_OVERRIDE}=true: taking only the weights of {path} despite: {r}" for r in refused]
    return notes


def load_weights(module, path: str) -> None:
    """The checkpoint's weights into ``module`` (a ``weights_only`` load; a folder of shards read
    whole in this process, before any process group).

    Raises:
        ConfigError: the shapes or names do not match (they are listed).
    """
    from ring_lightning.preflight import ConfigError
    from ring_lightning.training.checkpoint_io import checkpoint_weights

    state = checkpoint_weights(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()][:6]
        raise ConfigError(f"{WEIGHTS_ONLY_OVERRIDE}=true: the weights of {path} do not fit this model: "
                          + "; ".join(lines) + ". Use the checkpoint's model.* sizes, or train from scratch.") from None
