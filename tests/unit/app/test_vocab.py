"""The model's vocabulary follows the data's tokenizer: a BPE tokenizer
trained here with the `tokenizers` package (no download), saved as a bare tokenizer.json and as
a save_pretrained directory, sets model.vocab_size (rounded up to a multiple of 64); an explicit
model.vocab_size below the tokenizer's ids is refused by the pre-flight before anything starts."""

import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate

from ring_lightning import preflight
from ring_lightning.data.tokenizers import load_tokenizer, model_vocab_size
from test_configs import compose_cfg  # noqa: F401 (also registers train.py's resolvers)

BPE_IDS = 300  # the trained vocabulary: 256 byte-level symbols, 2 specials, merges up to 300
TEXT = "def add(x, y):\n    return x + y\n\nThe quick brown fox jumps over the lazy dog.\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """{"file": path of a tokenizer.json, "dir": a save_pretrained directory} of one BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([TEXT * 50], trainers.BpeTrainer(
        vocab_size=BPE_IDS, special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == BPE_IDS
    tok.save(str(root / "tokenizer.json"))  # a bare file: its eos is found by name (<|endoftext|>)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(root / "saved"))
    return {"file": str(root / "tokenizer.json"), "dir": str(root / "saved")}


def _cfg(tmp_path, tokenizer, *overrides):
    cfg = compose_cfg(tmp_path, ["data=files", f"data.tokenizer={tokenizer}", "data.seq_len=64",
                                 "data.batch_size=2", f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    (tmp_path / "doc.txt").write_text(TEXT * 200)
    return cfg


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_vocab_size_follows_a_local_tokenizer_rounded_up_to_64_and_trains(tmp_path, bpe, kind):
    cfg = _cfg(tmp_path, bpe[kind])
    datamodule = instantiate(cfg.data)
    notes = preflight.check_vocab_size(cfg, datamodule)
    assert datamodule.vocab_size == BPE_IDS and cfg.model.vocab_size == 320 == datamodule.model_vocab_size
    assert "model.vocab_size=320 from data.tokenizer=" in notes[0]
    module = instantiate(cfg.module, _convert_="all")
    assert module.model.tok_embeddings.num_embeddings == module.model.output.out_features == 320
    # The data is really tokenized by the BPE (ids past the bytes), and one step trains on it.
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].max() >= 256 and batch["input_ids"].max() < BPE_IDS
    batch = module.prepare_batch(batch)
    loss_sum, count = module.compute_loss(module(batch["input_ids"], batch["position_ids"]), batch)
    (loss_sum / count).backward()
    assert torch.isfinite(loss_sum) and module.model.tok_embeddings.weight.grad is not None


def test_explicit_vocab_size_below_the_tokenizer_is_refused_naming_the_override(tmp_path, bpe):
    cfg = _cfg(tmp_path, bpe["file"], "model.vocab_size=256")
    with pytest.raises(preflight.ConfigError, match=r"model\.vocab_size=256 is smaller than the vocabulary of "
                                                    r"data\.tokenizer=.*\(300 ids\): set model\.vocab_size >= 300, "
                                                    r"or drop the override.*\(320 for this one\)"):
        preflight.check_vocab_size(cfg, instantiate(cfg.data))
    assert not dist.is_initialized()  # refused before anything started
    cfg = _cfg(tmp_path, bpe["dir"], "model.vocab_size=300")  # an explicit value is kept as given
    assert preflight.check_vocab_size(cfg, instantiate(cfg.data)) == [] and cfg.model.vocab_size == 300


def test_byte_vocabulary_stays_259_and_a_named_vocabulary_overrides_it(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.model.vocab_size == 259 and preflight.check_vocab_size(cfg, instantiate(cfg.data)) == []
    assert model_vocab_size(259, "byte") == 259 and model_vocab_size(128256, "x") == 128256
    assert model_vocab_size(50257, "gpt2") == 50304
    cfg = compose_cfg(tmp_path, ["model=350m", "model.vocab_size=128256"])  # a 128256 head over byte data
    assert preflight.check_vocab_size(cfg, instantiate(cfg.data)) == [] and cfg.model.vocab_size == 128256


def test_missing_tokenizer_path_names_data_tokenizer(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer='\./nope/tokenizer\.json': no such file or directory; "
                                         r"valid values: 'byte', a tokenizer\.json file"):
        load_tokenizer("./nope/tokenizer.json")
