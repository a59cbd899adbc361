"""LongDocumentDataModule: determinism, packing, the embedded corpus, the retrieval task."""

import ast
import inspect
import os

import pytest
import torch

import ring_lightning.data as data_module
from ring_lightning.data import (
    IGNORE_INDEX,
    RETRIEVAL_VALUE_BASE,
    ByteTokenizer,
    LongDocumentDataModule,
    pack_documents,
    retrieval_accuracy,
)

EOS = ByteTokenizer.eos_token_id
SMALL = dict(seq_len=128, batch_size=4, max_tokens=20_000)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def first_batches(dm, n=2):
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)], next(iter(dm.val_dataloader()))


def test_datasets_is_imported_lazily():
    # The GPU machine has no `datasets`: importing ring_lightning.data must not need it.
    # (Checked on the source: a fresh interpreter importing lightning costs ~10 s here.)
    tree = ast.parse(inspect.getsource(data_module))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(name.split(".")[0] in ("datasets", "pyarrow", "transformers") for name in names)


def test_no_module_of_the_data_package_imports_datasets_at_top_level():
    # The check above reads the package's __init__; its submodules must be as lazy.
    folder = os.path.dirname(data_module.__file__)
    for filename in sorted(os.listdir(folder)):
        if not filename.endswith(".py"):
            continue
        with open(os.path.join(folder, filename)) as f:
            tree = ast.parse(f.read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(name.split(".")[0] in ("datasets", "pyarrow", "transformers") for name in names), filename


def test_stdlib_batches_are_real_text_with_next_token_labels(cache):
    (batch, _), val = first_batches(LongDocumentDataModule(cache_dir=cache, **dict(SMALL, batch_size=16)))
    # document_ids by default (the LM masks attention per document with them)
    assert set(batch) == {"input_ids", "labels", "document_ids"} and "position_ids" not in batch
    assert batch["input_ids"].shape == (16, 128) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    dm_text = "".join(ByteTokenizer().decode(dm_row) for dm_row in batch["input_ids"])
    assert sum(c.isprintable() or c.isspace() for c in dm_text) > 0.95 * len(dm_text)
    # Python source: a few thousand bytes of the standard library define and return things.
    assert dm_text.count("def ") + dm_text.count("return") + dm_text.count("import") >= 2, dm_text[:300]
    assert val["input_ids"].shape[1] == 128


def test_two_builds_give_identical_batches(tmp_path):
    a = first_batches(LongDocumentDataModule(cache_dir=str(tmp_path / "a"), **SMALL))
    b = first_batches(LongDocumentDataModule(cache_dir=str(tmp_path / "b"), **SMALL))
    c = first_batches(LongDocumentDataModule(cache_dir=str(tmp_path / "a"), **SMALL))  # from the cache
    for other in (b, c):
        for x, y in zip(a[0] + [a[1]], other[0] + [other[1]]):
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert len(os.listdir(tmp_path / "a")) == 1  # cached once, reused


def test_packing_keeps_eos_between_documents():
    tok = ByteTokenizer()
    docs = ["abc", "defgh", "ij", "klmnopq"]
    windows = pack_documents(iter(docs), tok, seq_len=5, max_tokens=None)
    stream = [t for w in windows for t in w.tolist()]
    expected = [t for d in docs for t in list(d.encode()) + [EOS]]
    assert windows.shape == (3, 6) and stream == expected[: len(stream)]
    assert pack_documents(iter(docs), tok, seq_len=3, max_tokens=8).shape == (2, 4)


def test_document_ids_follow_eos(tmp_path):
    f = tmp_path / "docs"
    f.mkdir()
    for i in range(30):
        (f / f"{i:02d}.txt").write_text("x" * (5 + i))
    dm = LongDocumentDataModule(source="files", paths=str(f), seq_len=32, batch_size=2,
                                return_document_ids=True, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    sample = dm.train_dataset[0]
    eos = (sample["input_ids"] == EOS).nonzero().flatten()
    assert len(eos) >= 1
    doc = sample["document_ids"]
    assert doc[0] == 0 and torch.all(doc[1:] >= doc[:-1])
    assert doc[eos[0]] == 0 and doc[eos[0] + 1] == 1  # EOS closes document 0


def test_files_source_reads_globs(tmp_path):
    for i in range(3):
        (tmp_path / f"a{i}.txt").write_text(f"document {i} " * 100)
    dm = LongDocumentDataModule(source="files", paths=[str(tmp_path / "*.txt")], seq_len=64,
                                batch_size=2, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    text = ByteTokenizer().decode(dm.train_dataset[0]["input_ids"])
    assert "document" in text


def test_retrieval_answers_sit_far_from_their_keys():
    dm = LongDocumentDataModule(source="retrieval", seq_len=256, batch_size=2, retrieval_num_samples=8,
                                retrieval_num_pairs=4)
    dm.setup("fit")
    for i in range(4):
        s = dm.train_dataset[i]
        x, labels, mask = s["input_ids"], s["labels"], s["loss_mask"]
        assert x.shape == labels.shape == mask.shape == (256,)
        answers = (labels != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(answers, mask.nonzero().flatten()) and len(answers) == 4
        for t in answers.tolist():
            key, value = x[t].item(), labels[t].item()
            key_pos = (x[:t] == key).nonzero().flatten()
            assert len(key_pos) == 1, "each key appears once before its query"
            assert x[key_pos[0] + 1] == value, "the pair in the context holds the answer"
            assert t - key_pos[0] >= 256 // 2 - 2 * 4
        # The value never shows up near the query: the answer must come from the pairs.
        is_value = (x >= RETRIEVAL_VALUE_BASE) & (x < RETRIEVAL_VALUE_BASE + 16)
        assert is_value.nonzero().max() < 1 + 2 * 4
    # Positions 0..127 and 128..255: different ranks for sp=2, contiguous or zigzag.
    assert answers.min() >= 128 and answers.max() < 192
    assert torch.equal(dm.train_dataset[3]["input_ids"], dm.train_dataset[3]["input_ids"])  # pure function of i
    assert not torch.equal(dm.train_dataset[0]["input_ids"], dm.val_dataset[0]["input_ids"])


def test_retrieval_accuracy_counts_only_answers():
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 3, 0, 2]]), 5).float()
    correct, total = retrieval_accuracy(logits, labels)
    assert (correct.item(), total.item()) == (1.0, 2.0)


def test_the_retrieval_task_supplies_its_metric_and_text_data_none(cache):
    dm = LongDocumentDataModule(source="retrieval", seq_len=64, retrieval_num_samples=8)
    assert dm.task_metric == "retrieval_acc" and dm.task_metric_fn is retrieval_accuracy
    text = LongDocumentDataModule(cache_dir=cache, **SMALL)
    assert text.task is None and text.task_metric is None and text.task_metric_fn is None


def test_hub_offline_error_says_what_to_do(monkeypatch, cache):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = LongDocumentDataModule(source="hub", hub_name="someone/long-docs", cache_dir=cache, **SMALL)
    with pytest.raises(RuntimeError, match="offline") as info:
        dm.prepare_data()
    assert "source='stdlib'" in str(info.value) and "someone/long-docs" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(source="web"), "source"),
        (dict(seq_len=1), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(max_tokens=10), "max_tokens"),
        (dict(source="hub"), "hub_name"),
        (dict(source="files"), "paths"),
        (dict(source="files", paths="/nonexistent/*.txt"), "paths"),
        (dict(source="retrieval", retrieval_num_pairs=20), "retrieval_num_pairs"),
        (dict(source="retrieval", retrieval_num_values=100), "retrieval_num_values"),
        (dict(source="retrieval", seq_len=16, retrieval_num_pairs=8), "retrieval_query_start"),
        (dict(source="retrieval", tokenizer="gpt2"), "tokenizer"),
    ],
)
def test_bad_arguments_raise_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LongDocumentDataModule(**kwargs)


# ------------------------------------------------------------------ resumable loader
from ring_lightning.data.resumable import EpochShuffleSampler, ResumableDataLoader  # noqa: E402


class _Recording(list):
    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def _batches(loader):
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumable_loader_continues_at_the_saved_batch_once(num_workers):
    """A loader restored 3 batches into epoch 1 yields that epoch's batches 3.. exactly, loads
    no skipped sample, keeps its full length, and yields whole epochs afterwards."""
    data = _Recording(range(20))
    data.read = []
    position = {"now": (1, 3, 5)}

    def make():
        return ResumableDataLoader(data, batch_size=4, sampler=EpochShuffleSampler(data, seed=7),
                                   num_workers=num_workers, persistent_workers=num_workers > 0,
                                   position=lambda: position["now"])

    reference = make()
    reference.sampler.set_epoch(1)
    epoch1 = _batches(reference)
    reference.sampler.set_epoch(2)
    epoch2 = _batches(reference)
    assert epoch1 != epoch2 and sorted(sum(epoch1, [])) == data  # a new order per epoch, every sample once

    saved = reference.state_dict()
    assert saved == {"epoch": 1, "batches": 3, "epoch_batches": 5, "num_batches": 5}
    resumed = make()
    resumed.load_state_dict(saved)  # the loader sets its sampler's epoch: Lightning does so too late
    assert len(resumed) == 5
    data.read.clear()
    assert _batches(resumed) == epoch1[3:]
    if num_workers == 0:  # (a worker's reads happen in its own process)
        assert sorted(data.read) == sorted(sum(epoch1[3:], []))  # the skipped batches were never loaded
    resumed.sampler.set_epoch(2)
    position["now"] = (2, 0, 5)
    assert _batches(resumed) == epoch2  # the skip applies to the resumed epoch only


def test_resumable_loader_starts_the_next_epoch_whole_after_an_end_of_epoch_checkpoint():
    data = list(range(8))
    make = lambda: ResumableDataLoader(data, batch_size=2, sampler=EpochShuffleSampler(data), position=lambda: (0, 4, 4))
    reference = make()
    reference.sampler.set_epoch(1)
    loader = make()
    loader.load_state_dict({"epoch": 0, "batches": 4, "num_batches": 4})
    assert _batches(loader) == _batches(reference)  # epoch 1, whole, before Lightning sets the epoch
    # under trainer.limit_train_batches=2 the loop's epoch ends after 2 of the loader's 4 batches
    loader = make()
    loader.load_state_dict({"epoch": 0, "batches": 2, "epoch_batches": 2, "num_batches": 4})
    assert _batches(loader) == _batches(reference)


def test_resumable_loader_leaves_the_global_random_generator_alone():
    """Building an iterator draws the workers' base seed from the loader's own generator: the
    global generator, which a checkpoint restores (RandomState), is where the run left it."""
    data = list(range(8))
    loader = ResumableDataLoader(data, batch_size=2, sampler=EpochShuffleSampler(data),
                                 generator=torch.Generator().manual_seed(0), position=lambda: (0, 0, 4))
    before = torch.get_rng_state()
    _batches(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_resumable_loader_warns_when_the_epoch_length_changed():
    data = list(range(8))
    loader = ResumableDataLoader(data, batch_size=2, sampler=EpochShuffleSampler(data), position=lambda: (0, 1, 8))
    loader.load_state_dict({"epoch": 0, "batches": 1, "num_batches": 8})
    with pytest.warns(UserWarning, match="data.batch_size"):
        assert len(_batches(loader)) == 4
