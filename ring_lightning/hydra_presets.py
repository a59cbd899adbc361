"""The model presets as Hydra's ``model`` config group (``python train.py model=350m``).

``ring_lightning.model.PRESETS`` is the one source of the sizes; this registers each one in
Hydra's ConfigStore so ``conf/`` holds no copy to keep equal. Every ModelConfig field is a
key of the node, so any of them can be overridden on the command line
(``model=350m model.n_layers=12``); fields a preset leaves to its default, and the derived
ones (``hidden_dim=None``, ``n_kv_heads=None``), stay derived when another field changes.
"""

from dataclasses import fields

from hydra.core.config_store import ConfigStore

from ring_lightning.model_config import PRESETS, ModelConfig


def preset_node(name: str) -> dict:
    """Every ModelConfig field: the preset's values over the dataclass defaults."""
    return {**{f.name: f.default for f in fields(ModelConfig)}, **PRESETS[name]}


def register_model_presets() -> None:
    """Store ``model/<name>`` for every preset (idempotent: later calls replace the nodes)."""
    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group="model", name=name, node=preset_node(name))
