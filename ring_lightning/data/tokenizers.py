"""Tokenizers with one small interface: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

``byte`` needs no download and no extra package, so every source (and the retrieval task,
which lives inside the byte vocabulary) works offline; any other name is a Hugging Face
tokenizer, imported only when asked for.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np


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
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"tokenizer={name!r} needs the `transformers` package (pip install transformers); "
                f"tokenizer='byte' needs nothing"
            ) from err
        self.name = name
        self._tok = AutoTokenizer.from_pretrained(name)
        self.eos_token_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer={name!r} has no eos (or sep) token to put between documents")
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(name: str) -> Union[ByteTokenizer, HFTokenizer]:
    """``"byte"`` -> ByteTokenizer; anything else is a Hugging Face tokenizer name or path."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)
