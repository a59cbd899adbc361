"""A tiny Hugging Face causal LM with its own tokenizer in a save_pretrained directory (no hub):
what `model.name_or_path` points at in the unit and integration tiers."""

from __future__ import annotations

TINY_FIELDS = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=512)


def pretrained_dir(path, family: str = "llama") -> str:
    """Save a randomly initialised ``family`` model and a byte-level BPE tokenizer trained here into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nclass A:\n    pass\n" * 50],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = AutoConfig.for_model(family, **{**TINY_FIELDS, "vocab_size": len(fast)})
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return str(path)
