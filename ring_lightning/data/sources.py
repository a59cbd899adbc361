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
"""

from __future__ import annotations

import glob
import os
import random
import sys
import sysconfig
from typing import Any, Iterator, List, Optional, Sequence, Union

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


def expand_paths(paths: Union[str, Sequence[str], None]) -> List[str]:
    """Files named by ``paths`` (files, directories searched recursively, or globs), sorted.

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
                for dirpath, _, filenames in os.walk(match):
                    out.update(os.path.join(dirpath, f) for f in filenames)
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
        return _read_files(files)


def _read_files(files: Sequence[str]) -> Iterator[str]:
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
    """Local text files, directories (searched recursively) or glob patterns."""

    def __init__(self, paths: Union[str, Sequence[str], None]):
        expand_paths(paths)  # fail when the data module is built, not later in a worker
        self.paths = paths

    def files(self) -> List[str]:
        return expand_paths(self.paths)

    def fingerprint(self) -> Any:
        return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in self.files()]


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
