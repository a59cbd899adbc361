"""Tokenizers with one small interface: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

``byte`` needs no download and no extra package, so every source (and the retrieval task,
which lives inside the byte vocabulary) works offline; anything else is a Hugging Face
tokenizer (``transformers``, imported only when asked for): a local ``tokenizer.json`` file,
a ``save_pretrained`` directory, or a hub name.

:func:`model_vocab_size` is the one rule for the model's vocabulary (embedding rows and LM
head columns) given a tokenizer: its ids rounded up to a multiple of :data:`VOCAB_MULTIPLE`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence, Union

import numpy as np

# The LM head is a (C, V) matmul: V a multiple of 64 keeps it on the tensor cores' tiles (a
# 128256-entry Llama 3 vocabulary already is one). The byte vocabulary stays exactly 259: its
# head is negligible, and byte runs measured before (README, recipes/README.md) stay identical.
VOCAB_MULTIPLE = 64
# A bare tokenizer.json names no end-of-text token; these conventional ones are looked up in
# its vocabulary (in this order) to separate packed documents.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus PAD=256, BOS=257, EOS=258. Needs no download."""

    name = "byte"
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers``, imported lazily) with the same interface."""

    def __init__(self, name: str):
        try:
            import transformers  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"tokenizer={name!r} needs the `transformers` package (pip install transformers); "
                f"tokenizer='byte' needs nothing"
            ) from err
        self.name = name
        self._tok = _load_hf_tokenizer(name)
        self.eos_token_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer={name!r} has no eos (or sep) token to put between documents; save it "
                             f"with one (PreTrainedTokenizerFast(..., eos_token=...).save_pretrained(dir)) and "
                             f"pass the directory")
        # Ids, not entries: a vocabulary with holes still needs a row for its largest id.
        self.vocab_size = max(len(self._tok), max(self._tok.get_vocab().values(), default=-1) + 1)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def _load_hf_tokenizer(name: str):
    """A local tokenizer.json, a save_pretrained directory, or a hub name -> a transformers tokenizer.

    Raises:
        ValueError: a path that does not exist, or a name that cannot be loaded (the message
            names ``tokenizer`` and what it accepts).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.path.expanduser(name)
    accepted = ("valid values: 'byte', a tokenizer.json file, a save_pretrained directory, or a Hugging Face "
                "hub name (downloaded once)")
    if os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder)  # a save_pretrained dir: its special tokens too
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=path)  # AutoTokenizer cannot read a bare file
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises its own types
            raise ValueError(f"tokenizer={name!r} is not a tokenizer.json file ({err}); {accepted}") from err
        if tok.eos_token is None:
            vocab = tok.get_vocab()
            tok.eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        return tok
    if os.path.isdir(path) or name.startswith((".", "/", "~")):
        if not os.path.exists(path):
            raise ValueError(f"tokenizer={name!r}: no such file or directory; {accepted}")
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"tokenizer={name!r} holds no tokenizer ({str(err).splitlines()[0]}); {accepted}") from err
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:  # not on the hub, or offline without a cached copy
        raise ValueError(f"tokenizer={name!r} could not be loaded ({str(err).splitlines()[0]}); {accepted}") from err


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str) -> Union[ByteTokenizer, HFTokenizer]:
    """``"byte"`` -> ByteTokenizer; anything else is a Hugging Face tokenizer file, directory or
    name. Cached: the pre-flight, the config's vocabulary and the data module share one load."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def model_vocab_size(num_ids: int, tokenizer_name: str = "") -> int:
    """Rows of the model's embedding (and columns of its head) for a tokenizer of ``num_ids`` ids:
    rounded up to a multiple of ``VOCAB_MULTIPLE`` for the tensor cores; the byte vocabulary is
    kept exact (259)."""
    if tokenizer_name == "byte":
        return num_ids
    return VOCAB_MULTIPLE * math.ceil(num_ids / VOCAB_MULTIPLE)


def tokenizer_vocab_size(tokenizer_name: str) -> int:
    """``model_vocab_size`` of the named tokenizer: what ``model.vocab_size`` follows by default
    (the ``tokenizer_vocab`` resolver, ring_lightning/app/hydra_presets.py)."""
    return model_vocab_size(load_tokenizer(str(tokenizer_name)).vocab_size, str(tokenizer_name))
