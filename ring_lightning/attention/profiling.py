"""Measured figures for ``get_profiling_stats()``: device events on CUDA, perf_counter on CPU.

Compute time is the time of the block kernels; communication time is the time the
compute stream (CUDA) or the host (CPU) stood waiting for a transfer, i.e. the transfer
time that the overlap did not hide. Events are resolved lazily, when stats are read, so
recording them costs no synchronisation on the hot path. The hybrid's all-to-all over heads
(ulysses.py) is counted apart: ``all_to_all_bytes`` (sent to the other ranks of the group)
and ``all_to_all_time_ms`` (the exchanges and their layout copies; not overlapped).
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: List[tuple] = []
        self.total = 0.0

    @contextmanager
    def span(self):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            stop.record()
            self.spans.append((start, stop))
        else:
            t0 = time.perf_counter()
            yield
            self.total += (time.perf_counter() - t0) * 1e3

    def absorb(self, other: "_Timer") -> None:
        """Take over another timer's spans (figures measured before this one existed)."""
        self.spans += other.spans
        self.total += other.total

    def ms(self) -> float:
        if self.spans:
            self.spans[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.spans)
            self.spans = []
        return self.total


class RingProfiler:
    """Figures of the most recent forward + backward of one attention module."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.calls = 0
        self.steps_log: List[dict] = []
        self.reset(torch.device("cpu"))

    def reset(self, device: torch.device, profile_memory: bool = False) -> None:
        """Start a new call's figures (at each forward)."""
        self.device = device
        self.total, self.compute, self.comm = _Timer(device), _Timer(device), _Timer(device)
        self.bytes_sent = 0
        self.document_bytes_saved = 0  #: K/V bytes not sent: no task of theirs shares a document
        self.ring_steps = 0
        self.skipped_blocks = 0
        self.computed_blocks = 0
        self.computed_tiles = 0
        # hybrid parallelism (ulysses.py): what this rank sent to the others of its all-to-all group
        self.ulysses_size = 1
        self.all_to_all_bytes = 0
        self.all_to_all = _Timer(device)
        self.steps_log = []
        if profile_memory and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def log_step(self, **fields) -> None:
        self.steps_log.append(fields)

    def stats(self) -> Dict[str, object]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            # Peak resident memory of this process (KiB on Linux): a real, process-wide figure.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "total_time_ms": self.total.ms(),
            "compute_time_ms": self.compute.ms(),
            "comm_time_ms": self.comm.ms(),
            "comm_volume_mb": self.bytes_sent / 2**20,
            "document_bytes_saved": self.document_bytes_saved,
            "peak_memory_mb": peak,
            "ring_steps": self.ring_steps,
            "skipped_blocks": self.skipped_blocks,
            "computed_blocks": self.computed_blocks,
            "computed_tiles": self.computed_tiles,
            "calls": self.calls,
            "ulysses_size": self.ulysses_size,
            "all_to_all_bytes": self.all_to_all_bytes,
            "all_to_all_volume_mb": self.all_to_all_bytes / 2**20,
            "all_to_all_time_ms": self.all_to_all.ms(),
            "steps": list(self.steps_log),
        }
