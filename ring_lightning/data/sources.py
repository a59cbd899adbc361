"""Text sources: where the documents come from, in which order, and what identifies them.

Each source answers two questions for the data module:

* ``texts(seed)``: the documents, one string each, in a seeded order where the source
  allows it (a prefix cut by ``max_tokens`` then samples the whole corpus, and the
  held-out tail is not one alphabetical corner of it);
* ``fingerprint()``: JSON-able data that changes whenever the documents do, so that the
  window cache is rebuilt exactly when it must be.

Sources: ``stdlib`` (the Python standard library's ``.py`` files: real text, no download),
``files`` (local files, directories or globs) and ``hub`` (a Hugging Face dataset, streamed;
``datasets`` is imported only when it is read).

``files`` trains on text only: directories are walked without their hidden entries (``.git``,
``.venv``, ``.DS_Store``: a checkout's compressed objects are not text), and a binary file (a
NUL byte, or more than ``MAX_UNDECODABLE`` of its bytes not UTF-8) is skipped with one line
naming it. ``FileSource.survey`` measures the corpus for the pre-flight, which refuses an empty
or too-short one before any process starts.
"""

from __future__ import annotations

import glob
import os
import random
import sys
import sysconfig
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

#: Valid values of ``source=`` that read text (the retrieval task is generated instead).
TEXT_SOURCES = ("stdlib", "files", "hub")
#: What to do when the hub cannot be reached (read by train.py's pre-flight check too).
HUB_OFFLINE_ADVICE = (
    "If this machine is offline: build the cache once on a machine with internet (the packed windows are "
    "cached under cache_dir and reused offline), or download the data and use source='files' with "
    "paths=... (train.py: data=files \"data.paths=[...]\"), or use source='stdlib' (data=stdlib, no download).")


def stdlib_files() -> List[str]:
    """The standard library's ``.py`` files, sorted (site-packages and caches excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


MAX_UNDECODABLE = 0.01  #: a file with more than this fraction of bytes that are not UTF-8 is binary
SURVEY_BYTES = 1 << 16  #: bytes of each file the pre-flight looks at


def is_binary(data: bytes) -> bool:
    """A NUL byte, or more than ``MAX_UNDECODABLE`` of the bytes outside UTF-8 (a cut-off last
    character is not counted against a sample)."""
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        kept = len(data.decode("utf-8", errors="ignore").encode("utf-8"))
        return len(data) - kept > max(3, MAX_UNDECODABLE * len(data))


def expand_paths(paths: Union[str, Sequence[str], None], hidden: Optional[List[str]] = None) -> List[str]:
    """Files named by ``paths`` (files, directories searched recursively, or globs), sorted.
    Inside a directory, hidden entries (``.git``, ``.cache``, ``.DS_Store``) are not walked; their
    paths are appended to ``hidden`` when given. A file named explicitly is kept even if hidden.

    Raises:
        ValueError: nothing given or nothing matched.
    """
    if paths is None or (isinstance(paths, (list, tuple)) and not paths):
        raise ValueError("source='files' needs paths=... (files, directories or glob patterns)")
    out = set()
    for p in [paths] if isinstance(paths, str) else list(paths):
        p = os.path.expanduser(str(p))
        for match in glob.glob(p, recursive=True) or []:
            if os.path.isdir(match):
                for dirpath, dirnames, filenames in os.walk(match):
                    skipped = [d for d in dirnames if d.startswith(".")] + [f for f in filenames if f.startswith(".")]
                    if hidden is not None:
                        hidden.extend(os.path.join(dirpath, d) for d in skipped)
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                    out.update(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
            elif os.path.isfile(match):
                out.add(match)
    if not out:
        raise ValueError(f"paths={paths!r} matched no file")
    return sorted(out)


class _FileListSource:
    """A list of local files, read whole, in a seeded shuffle."""

    def files(self) -> List[str]:
        raise NotImplementedError

    def texts(self, seed: int) -> Iterator[str]:
        files = self.files()
        random.Random(seed).shuffle(files)
        return self._read(files)

    def _read(self, files: Sequence[str]) -> Iterator[str]:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


class StdlibSource(_FileListSource):
    """The standard library's own ``.py`` files, which every Python install carries."""

    def files(self) -> List[str]:
        return stdlib_files()

    def fingerprint(self) -> Any:
        root = sysconfig.get_paths()["stdlib"]
        # Sizes, not mtimes: the same Python version on another machine hits the cache.
        return [sys.version, [(os.path.relpath(f, root), os.path.getsize(f)) for f in self.files()]]


class FileSource(_FileListSource):
    """Local text files, directories (searched recursively, hidden entries left out) or glob
    patterns; binary files are skipped with one line naming them."""

    def __init__(self, paths: Union[str, Sequence[str], None]):
        expand_paths(paths)  # fail when the data module is built, not later in a worker
        self.paths = paths
        self._reported: set = set()  # binary files already named (by the survey or the reader)

    def files(self) -> List[str]:
        return expand_paths(self.paths)

    def fingerprint(self) -> Any:
        # "text-only": windows cached before binary files were skipped are not reused
        return ["text-only", [(f, os.path.getsize(f), os.path.getmtime(f)) for f in self.files()]]

    def survey(self) -> Dict[str, Any]:
        """What the corpus holds, from the first ``SURVEY_BYTES`` of every file: ``text`` (paths),
        ``text_bytes`` (their total size), ``binary`` and ``hidden`` (paths left out)."""
        hidden: List[str] = []
        text, binary, size = [], [], 0
        for path in expand_paths(self.paths, hidden):
            with open(path, "rb") as f:
                head = f.read(SURVEY_BYTES)
            if is_binary(head):
                binary.append(path)
            else:
                text.append(path)
                size += os.path.getsize(path)
        self._reported.update(binary)
        return {"text": text, "text_bytes": size, "binary": binary, "hidden": hidden}

    def _read(self, files: Sequence[str]) -> Iterator[str]:
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            if is_binary(data):
                if path not in self._reported:
                    self._reported.add(path)
                    print(f"data: skipping {path}: binary (a NUL byte or bytes that are not UTF-8)", flush=True)
                continue
            yield data.decode("utf-8", errors="replace")


def _names(paths: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def corpus_notes_and_error(survey: Dict[str, Any], seq_len: int, max_tokens: Optional[int],
                           byte_tokens: bool) -> Tuple[List[str], Optional[str]]:
    """(notes, error or None) of a ``FileSource.survey``: skipped entries named in one line each;
    an error when no text is left or it cannot fill the two windows of ``seq_len + 1`` tokens a
    run needs (one to train, one to validate). Bytes bound the tokens of byte-level tokenizers."""
    notes = []
    if survey["hidden"]:
        notes.append(f"data: not reading hidden entries {_names(survey['hidden'])} (version control, caches)")
    if survey["binary"]:
        notes.append(f"data: skipping binary file(s) {_names(survey['binary'])} (a NUL byte or bytes that are "
                     f"not UTF-8)")
    need = 2 * (seq_len + 1)
    if not survey["text"]:
        return notes, (f"data.paths holds no text file to train on ({len(survey['binary'])} binary skipped); point "
                       f"data.paths at text files (.txt, .md, source code)")
    if survey["text_bytes"] == 0:
        return notes, (f"data.paths: the corpus is empty ({_names(survey['text'])} hold no text); a run needs "
                       f"{need} tokens (2 windows of data.seq_len + 1 = {seq_len + 1}): point data.paths at text")
    tokens = survey["text_bytes"] + len(survey["text"])  # + one EOS per document
    if max_tokens is not None:
        tokens = min(tokens, max_tokens)
    if tokens < need:
        what = "tokens" if byte_tokens else "bytes (at most as many tokens)"
        return notes, (f"data.paths: the corpus is too short: {tokens} {what} in {_names(survey['text'])}; a run "
                       f"needs 2 windows of data.seq_len + 1 = {seq_len + 1} tokens, {need} in all "
                       f"(one to train, one to validate). Add documents, or lower data.seq_len"
                       + (" or raise data.max_tokens" if max_tokens is not None and max_tokens < need else ""))
    return notes, None


class HubSource:
    """One text column of a Hugging Face hub dataset, streamed in the hub's order."""

    def __init__(self, name: Optional[str], config: Optional[str], split: str, column: str):
        if not name:
            raise ValueError("source='hub' needs hub_name=... (a Hugging Face dataset name)")
        self.name, self.config, self.split, self.column = name, config, split, column

    def fingerprint(self) -> Any:
        return [self.name, self.config, self.split, self.column]

    def check_reachable(self, timeout_s: float = 10.0) -> None:
        """Ask the hub about the dataset once (a second at most when offline), before any
        process starts; raise ConnectionError with what to do instead.

        Honours ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` (no request at all then).
        """
        from huggingface_hub import HfApi

        if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes"):
            err: Any = "HF_DATASETS_OFFLINE is set"
        else:
            try:
                HfApi().dataset_info(self.name, timeout=timeout_s)
                return
            except Exception as exc:  # offline, unknown name, no access: one message
                err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ConnectionError(f"data=hub: cannot reach hub dataset data.hub_name={self.name!r} ({err}), and its "
                              f"windows are not cached yet. {HUB_OFFLINE_ADVICE}")

    def texts(self, seed: int) -> Iterator[str]:
        # A stream has no cheap shuffle: the seed is unused and the hub's order is kept.
        import datasets

        try:
            stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:  # connection, auth, unknown name: one actionable message
            raise RuntimeError(
                f"could not load hub dataset hub_name={self.name!r} (hub_config={self.config!r}, "
                f"hub_split={self.split!r}): {err}\n{HUB_OFFLINE_ADVICE}"
            ) from err
        for row in stream:
            if self.column not in row:
                raise ValueError(f"text_column={self.column!r} is not a column of {self.name!r}; "
                                 f"columns: {sorted(row)}")
            yield row[self.column]


def text_source(source: str, paths: Union[str, Sequence[str], None] = None, hub_name: Optional[str] = None,
                hub_config: Optional[str] = None, hub_split: str = "train", text_column: str = "text"):
    """The source named ``source`` (one of ``TEXT_SOURCES``), built from the data module's arguments.

    Raises:
        ValueError: an unknown ``source``, or the arguments that source needs are missing.
    """
    if source == "stdlib":
        return StdlibSource()
    if source == "files":
        return FileSource(paths)
    if source == "hub":
        return HubSource(hub_name, hub_config, hub_split, text_column)
    raise ValueError(f"source={source!r} is not a text source; valid values: {TEXT_SOURCES}")
