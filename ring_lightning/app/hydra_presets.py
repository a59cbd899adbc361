"""The model presets as Hydra's ``model`` config group (``python train.py model=350m``).

``ring_lightning.models.model.PRESETS`` is the one source of the sizes; this registers each one in
Hydra's ConfigStore so ``conf/`` holds no copy to keep equal. Every ModelConfig field is a
key of the node, so any of them can be overridden on the command line
(``model=350m model.n_layers=12``); fields a preset leaves to its default, and the derived
ones (``hidden_dim=None``, ``n_kv_heads=None``), stay derived when another field changes.

``model.vocab_size`` follows the data's tokenizer: the node holds
``${tokenizer_vocab:${data.tokenizer}}`` (the resolver registered here), which is the tokenizer's
ids rounded up to a multiple of 64 (``ring_lightning.data.tokenizers.model_vocab_size``; the
byte tokenizer stays 259). An explicit ``model.vocab_size=N`` replaces it; the pre-flight
refuses one smaller than the tokenizer (``preflight.check_vocab_size``).

``model=hf`` is not a size but a Hugging Face causal LM (``ring_lightning.hf.HFCausalLM``, needs
``pip install -e ".[hf]"``): its node (:data:`HF_MODEL`) names the model, selects the ``module``
option ``hf`` (:data:`HF_MODULE`, the LightningModule, instead of ``conf/module/lm.yaml``; conf/config.yaml
lists ``module`` before ``model`` so the override applies), and ``model.tokenizer`` (default: the model's
own, ``name_or_path``) is what ``conf/data/stdlib.yaml`` tokenizes with::

    python train.py model=hf model.name_or_path=path/to/pretrained      # or a hub name
    python train.py model=hf 'model.config={model_type: llama, hidden_size: 256, ...}'   # random init
"""

from dataclasses import fields

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ring_lightning.models.model_config import PRESETS, ModelConfig

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
    register_hf_options()  # model=hf: a Hugging Face causal LM


#: ``model=hf`` (package ``_global_``: it also sets the module option and the data's tokenizer).
HF_MODEL = {
    "defaults": [{"override /module": "hf"}, "_self_"],
    "model": {
        "name_or_path": None,         # a save_pretrained directory or a hub name
        "config": None,               # without name_or_path: {model_type: llama, ...} (random init); with it: overrides
        "tokenizer": "${coalesce:${model.name_or_path},byte}",  # the data's too (conf/data/stdlib.yaml)
        "dtype": "float32",           # the weights; bf16-mixed comes from trainer.precision
        "export_dir": "${paths.output_dir}/hf_model",  # save_pretrained at the end of fit (null: none)
        "checkpointing": "none",      # none | full | offload (the checkpointing group sets none / full)
        "checkpoint_every_n_layers": 1,
    },
}

#: ``module=hf``: HFCausalLM's arguments, read from ``model`` (selected by ``model=hf``).
HF_MODULE = {
    "_target_": "ring_lightning.hf.HFCausalLM",
    "name_or_path": "${model.name_or_path}",
    "config": "${model.config}",
    "tokenizer": "${model.tokenizer}",
    "dtype": "${model.dtype}",
    "checkpointing": "${model.checkpointing}",
    "checkpoint_every_n_layers": "${model.checkpoint_every_n_layers}",
    "export_dir": "${model.export_dir}",
    "attention": "${variant}",
    "lr": 1.0e-4,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "warmup_steps": 10,
    "max_steps": "${trainer.max_steps}",
    "min_lr_ratio": 0.1,
    "document_mask": True,
    "restart_positions_per_document": False,
    "num_items_in_batch": False,
}


def _coalesce(*values):
    """The first value that is set (not None / null)."""
    return next((v for v in values if v is not None and v != "null"), None)


def register_hf_options() -> None:
    """Store ``model/hf`` and ``module/hf`` (idempotent) and the ``coalesce`` resolver they use."""
    OmegaConf.register_new_resolver("coalesce", _coalesce, replace=True)
    store = ConfigStore.instance()
    store.store(group="model", name="hf", node=HF_MODEL, package="_global_")
    store.store(group="module", name="hf", node=HF_MODULE)
