"""The model presets as Hydra's ``model`` config group (``python train.py model=350m``).

``ring_lightning.model.PRESETS`` is the one source of the sizes; this registers each one in
Hydra's ConfigStore so ``conf/`` holds no copy to keep equal. Every ModelConfig field is a
key of the node, so any of them can be overridden on the command line
(``model=350m model.n_layers=12``); fields a preset leaves to its default, and the derived
ones (``hidden_dim=None``, ``n_kv_heads=None``), stay derived when another field changes.

``model.vocab_size`` follows the data's tokenizer: the node holds
``${tokenizer_vocab:${data.tokenizer}}`` (the resolver registered here), which is the tokenizer's
ids rounded up to a multiple of 64 (``ring_lightning.data.tokenizers.model_vocab_size``; the
byte tokenizer stays 259). An explicit ``model.vocab_size=N`` replaces it; the pre-flight
refuses one smaller than the tokenizer (``preflight.check_vocab_size``).
"""

from dataclasses import fields

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ring_lightning.model_config import PRESETS, ModelConfig

# oc.select: a data config without a tokenizer field (a user's own data module) reads as bytes.
VOCAB_FROM_TOKENIZER = "${tokenizer_vocab:${oc.select:data.tokenizer,byte}}"


def _tokenizer_vocab(name: str) -> int:
    from ring_lightning.data.tokenizers import tokenizer_vocab_size

    return tokenizer_vocab_size(name)


def preset_node(name: str) -> dict:
    """Every ModelConfig field: the preset's values over the dataclass defaults, the vocabulary
    following ``data.tokenizer`` unless the preset names one."""
    return {**{f.name: f.default for f in fields(ModelConfig)}, "vocab_size": VOCAB_FROM_TOKENIZER, **PRESETS[name]}


def register_model_presets() -> None:
    """Store ``model/<name>`` for every preset and the ``tokenizer_vocab`` resolver
    (idempotent: later calls replace both)."""
    OmegaConf.register_new_resolver("tokenizer_vocab", _tokenizer_vocab, replace=True)
    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group="model", name=name, node=preset_node(name))
