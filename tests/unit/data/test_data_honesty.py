"""What data=files trains on (ring_lightning/data/sources.py, preflight.py, resumable.py): binary
files skipped naming them, a .git directory not walked, an empty or too-short corpus refused before
anything starts, and a checkpoint's data position dropped (with a note) when the corpus changed."""

import os

import pytest
import torch

from ring_lightning.data import LongDocumentDataModule, ResumableDataLoader
from ring_lightning.data.sources import FileSource, corpus_notes_and_error, is_binary
from ring_lightning.preflight import ConfigError, check_data_source


def corpus(tmp_path):
    root = tmp_path / "repo"
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "objects" / "ab12").write_bytes(bytes(range(256)) * 40)  # a compressed object
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # text, but not the user's corpus
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("# A\n" + "long document text, é and ü. " * 200)
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(3000))
    (root / "noise.bin").write_bytes(bytes(b | 0x80 for b in os.urandom(4000)))  # no NUL, not UTF-8
    (root / ".env").write_text("SECRET=1\n")
    return root


def test_binary_files_and_hidden_directories_are_left_out_with_one_line_each(tmp_path, capsys):
    root = corpus(tmp_path)
    source = FileSource([str(root)])
    assert source.files() == [str(root / "docs" / "a.md"), str(root / "logo.png"), str(root / "noise.bin")]
    survey = source.survey()
    assert survey["text"] == [str(root / "docs" / "a.md")]
    assert survey["binary"] == [str(root / "logo.png"), str(root / "noise.bin")]
    assert sorted(survey["hidden"]) == [str(root / ".env"), str(root / ".git")]
    notes, error = corpus_notes_and_error(survey, seq_len=64, max_tokens=None, byte_tokens=True)
    assert error is None and len(notes) == 2
    assert ".git" in notes[0] and "logo.png" in notes[1] and "noise.bin" in notes[1]
    texts = list(FileSource([str(root)]).texts(seed=0))  # the reader skips them too, naming each once
    assert len(texts) == 1 and "\ufffd" not in texts[0]
    out = capsys.readouterr().out
    assert out.count("data: skipping") == 2 and "logo.png" in out and "noise.bin" in out


def test_a_little_bad_utf8_is_text_and_a_nul_byte_is_not():
    assert not is_binary(("plain text " * 100).encode() + b"\xff")
    assert is_binary(b"text\x00more text")
    assert is_binary(bytes(b | 0x80 for b in range(200)))


@pytest.mark.parametrize("files, message", [
    ({"empty.txt": ""}, "the corpus is empty ("),
    ({"short.txt": "a few words\n"}, "2 windows of data.seq_len + 1 = 129 tokens, 258 in all"),
    ({"image.png": b"\x89PNG\x00\x00"}, "holds no text file to train on (1 binary skipped)"),
])
def test_an_empty_or_too_short_corpus_is_refused_in_the_preflight(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    dm = LongDocumentDataModule(source="files", paths=[str(tmp_path)], seq_len=128, batch_size=1,
                                cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as err:
        check_data_source(dm)
    assert message in str(err.value)
    assert all(name in str(err.value) for name in files if not name.endswith(".png"))


def loader(corpus_key):
    data = torch.arange(40)
    return ResumableDataLoader(data, batch_size=2, position=lambda: (0, 5, 20), corpus=corpus_key)


def test_a_changed_corpus_restarts_the_epoch_with_a_note():
    state = loader("windows-aaaa").state_dict()
    assert state["corpus"] == "windows-aaaa" and state["batches"] == 5
    same = loader("windows-aaaa")
    same.load_state_dict(state)
    assert len(list(iter(same))) == 15  # the same corpus: the 5 processed batches are skipped
    changed = loader("windows-bbbb")
    changed.load_state_dict(state)
    with pytest.warns(UserWarning, match="another corpus"):
        assert changed._resume_position() == 0
    kept = loader("windows-aaaa")
    kept.load_state_dict(state)
    assert kept._resume_position() == 5


def test_the_datamodule_ties_its_loader_to_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("text " * 400)
    dm = LongDocumentDataModule(source="files", paths=[str(tmp_path / "a.txt")], seq_len=64, batch_size=1,
                                cache_dir=str(tmp_path / "cache"))
    dm.setup()
    before = dm.train_dataloader().corpus
    os.utime(tmp_path / "a.txt", (1, 1))  # edited in place: same size, another modification time
    assert dm.train_dataloader().corpus != before
