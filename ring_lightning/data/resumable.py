"""A training DataLoader that a resumed run continues at the batch its checkpoint was taken at.

Lightning saves ``state_dict()`` of every training loader that has one in the checkpoint and
calls ``load_state_dict()`` on resume before the loader's first ``iter()``; a loader without
them restarts its epoch at the top, so a resumed run sees some batches twice and never sees
others (docs/ARCHITECTURE.md, "Runs that survive").

* The order of an epoch depends only on ``(seed, epoch)``: ``EpochShuffleSampler`` here, and
  under data parallelism the ``DistributedSampler`` Lightning puts in its place (seeded by
  ``seed_everything``, told the epoch by Lightning). A resumed run therefore draws the same
  permutation as the uninterrupted one, in every epoch and on every dp rank.
* The position saved is the number of batches the training loop has *processed* in the
  current epoch, read from the trainer (``position``), not the batches this loader yielded:
  Lightning fetches one batch ahead, so the loader's own count runs one too high.
* On resume the first iterator skips that many batches at the sampler (indices only: no
  skipped sample is loaded), so resuming costs nothing however far into the epoch.
* The position belongs to one corpus: ``corpus`` (a key that changes with the windows: the data
  module passes its window-cache key, which covers the files' names, sizes and modification
  times) is saved beside it, and a resume over another corpus restarts the epoch with a note
  instead of skipping into windows the checkpoint never saw.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, RandomSampler

Position = Callable[[], Tuple[int, int, int]]  # () -> (epoch, batches processed in it, batches it has)


class EpochShuffleSampler(RandomSampler):
    """A random permutation per epoch that depends only on ``seed + epoch`` (as
    ``DistributedSampler`` seeds its own), so a resumed run replays the same order."""

    def __init__(self, data_source, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at every epoch start
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class _SkipWhileResuming:
    """``indices`` without the loader's first ``_skip_now`` items. The loader sets ``_skip_now``
    only while its resumed iterator is being built (which iterates the indices more than once
    with workers); a persistent-workers iterator keeps this object, and later epochs see 0."""

    def __init__(self, loader: "ResumableDataLoader", indices) -> None:
        self.loader, self.indices = loader, indices

    def __iter__(self):
        it = iter(self.indices)
        for _ in range(self.loader._skip_now):
            next(it, None)
        return it

    def __len__(self) -> int:
        return len(self.indices) - self.loader._skip_now


class ResumableDataLoader(DataLoader):
    """``DataLoader`` plus Lightning's resumable-loader protocol (``state_dict`` /
    ``load_state_dict``). ``position()`` returns (epoch, batches the training loop has
    processed in it, batches the loop takes per epoch: fewer than ``len(self)`` under
    ``limit_train_batches``); every other argument is ``DataLoader``'s."""

    def __init__(self, dataset, *args: Any, position: Optional[Position] = None, corpus: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.position, self.corpus = position, corpus
        self._resume: Optional[Dict[str, int]] = None  # the checkpoint's position, until first used
        self._skip_now = 0

    def state_dict(self) -> Dict[str, int]:
        epoch, batches, epoch_batches = self.position() if self.position is not None else (0, 0, len(self))
        state = {"epoch": int(epoch), "batches": int(batches), "epoch_batches": int(epoch_batches),
                 "num_batches": len(self)}
        return {**state, "corpus": self.corpus} if self.corpus is not None else state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._resume = dict(state)

    def _resume_position(self) -> int:
        """Set the sampler to the checkpoint's epoch; return the batches of it to skip.

        Lightning builds (and prefetches from) the first iterator of a resumed fit before it
        tells the sampler the epoch, and at an epoch boundary it goes on with that iterator
        into the next epoch, so the epoch is set here: the saved one mid-epoch, the next one
        when the checkpoint was taken after the epoch's last batch.
        """
        state, self._resume = self._resume, None
        if state is None:
            return 0
        finished = state["batches"] >= state.get("epoch_batches", state["num_batches"])
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(state["epoch"] + 1 if finished else state["epoch"])
        if finished:
            return 0
        if state.get("corpus") is not None and self.corpus is not None and state["corpus"] != self.corpus:
            warnings.warn(
                f"the checkpoint was taken {state['batches']} batches into an epoch of another corpus (the data "
                f"files' names, sizes or modification times changed, or data.seq_len / data.max_tokens / the "
                f"tokenizer): the epoch restarts at its first batch of the new windows", stacklevel=2)
            return 0
        if state["num_batches"] != len(self):
            warnings.warn(
                f"the checkpoint was taken {state['batches']} batches into an epoch of {state['num_batches']} "
                f"batches; this run's epoch has {len(self)} (another data.batch_size, data.seq_len, data "
                f"source or number of data-parallel ranks), so the position cannot carry over: the epoch "
                f"restarts at its first batch", stacklevel=2)
            return 0
        return state["batches"]

    @property
    def _index_sampler(self):
        base = super()._index_sampler
        return _SkipWhileResuming(self, base) if self._skip_now else base

    def __iter__(self):
        self._skip_now = self._resume_position()
        try:
            return super().__iter__()  # builds its index iterator from _index_sampler now
        finally:
            self._skip_now = 0
