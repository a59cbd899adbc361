"""Hugging Face causal LMs under RingStrategy (needs ``pip install -e ".[hf]"``: transformers).

Importing this package registers ``attn_implementation="ring_lightning"`` with transformers'
public ``AttentionInterface`` (attention.py). ``HFCausalLM`` (module.py) is the LightningModule:
a pretrained model or a config, trained with the ring, exported with ``save_pretrained``.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as err:  # the one place that says how to get it
    raise ImportError(
        "ring_lightning.hf needs the `transformers` package: pip install -e \".[hf]\" "
        "(or pip install 'transformers>=5.0')"
    ) from err

from .attention import CORE_ATTRIBUTE, IMPLEMENTATION, attach_ring_attention, is_attention_layer, register

register()

from .module import HFCausalLM  # noqa: E402  (after the registration it relies on)

__all__ = ["HFCausalLM", "IMPLEMENTATION", "CORE_ATTRIBUTE", "attach_ring_attention", "is_attention_layer"]
