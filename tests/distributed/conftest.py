"""Run a function on N gloo CPU processes with a hard timeout.

Usage in a test::

    def test_something(run_distributed):
        results = run_distributed(my_worker, 2, arg1, timeout=60)   # list, rank order

``my_worker(rank, world_size, *args)`` must be importable by a fresh interpreter (a
module-level function, e.g. in a ``_something_worker.py`` helper next to the test), its
return value picklable. Each process gets a gloo default process group (FileStore in a
temporary directory, so no ports are involved) and ``OMP_NUM_THREADS=1``: CI has two
cores. If any rank raises, the other ranks are killed and the test fails with that
rank's traceback; if the deadline passes, every rank is killed and the test fails
naming the ranks that had not finished. A hang can never outlive ``timeout``.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback
from typing import Any, Callable, List

import pytest
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 90.0


def _child(fn: Callable, rank: int, world_size: int, init_file: str, args: tuple, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle bytes, not the queue's tensor sharing: shared-memory tensors need
        # the sender alive until received, and ranks are killed once all results are in.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs: List[mp.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes.

    Args:
        fn: a module-level function (pickled by reference into each process).
        world_size: number of processes.
        *args: picklable arguments passed to every rank.
        timeout: hard wall-clock limit in seconds for the whole group.

    Returns:
        The return values of ``fn``, in rank order.

    Raises:
        AssertionError: a rank raised (its traceback is in the message).
        TimeoutError: the group did not finish within ``timeout``.
    """
    ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ring_dist_") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_child, args=(fn, rank, world_size, init_file, args, results), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        outputs: dict = {}
        try:
            # Drain the queue before joining: a child blocks on exit until its result is read.
            while len(outputs) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s")
                try:
                    rank, status, value = results.get(timeout=min(remaining, 1.0))
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in outputs and not p.is_alive()]
                    if dead and results.empty():
                        time.sleep(0.5)  # a result may still be in flight from a rank that just exited
                        if results.empty():
                            raise AssertionError(
                                f"rank(s) {dead} exited without a result (exit codes "
                                f"{[procs[r].exitcode for r in dead]})"
                            )
                    continue
                if status == "error":
                    raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
                outputs[rank] = pickle.loads(value)
        finally:
            _stop(procs)
    return [outputs[r] for r in range(world_size)]


def run_parity_cases(world: int, cases: list, timeout: float = 600) -> List[dict]:
    """``_ring_worker.run_cases`` on ``world`` ranks (one rank: in this process): per-rank results."""
    import _ring_worker as worker

    if world == 1:
        return [worker.run_cases(0, 1, cases)]
    return run_distributed(worker.run_cases, world, cases, timeout=timeout)


def assert_matches_reference(per_rank: List[dict], case_id: str, tol: float) -> None:
    """Every rank's relative errors of ``case_id`` (outputs, lse, input gradients) within ``tol``."""
    for rank, res in enumerate(per_rank):
        r = res[case_id]
        assert "error" not in r, f"rank {rank}:\n{r.get('error')}"
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert r[key] <= tol, f"rank {rank} {key}: relative error {r[key]:.3g}"


@pytest.fixture(name="run_distributed", scope="session")
def _run_distributed_fixture() -> Callable[..., List[Any]]:
    """The :func:`run_distributed` helper as a fixture."""
    return run_distributed
