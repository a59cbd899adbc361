"""Reading a lost rank from the backend's errors: only collective errors count, connection
closed and timed out told apart; how a process ended, in words."""

import torch.distributed as dist

from ring_lightning.attention.comm import RingCommunicationError
from ring_lightning.sequence.faults import describe_exit, first_line, peer_failure

GLOO_CLOSED = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"


def test_collective_errors_are_read_as_a_lost_or_silent_peer():
    assert peer_failure(RuntimeError(GLOO_CLOSED)) == "connection"
    assert peer_failure(RuntimeError("Application timeout caused pair closure")) == "timeout"
    assert peer_failure(dist.DistBackendError("Timed out waiting 5000ms for recv operation")) == "timeout"
    assert peer_failure(RingCommunicationError("rank 0: ring transfer ... did not complete within 5s")) == "timeout"
    try:  # a wrapper raised while handling the backend's error still reads as the lost peer
        try:
            raise RuntimeError(GLOO_CLOSED)
        except RuntimeError as inner:
            raise ValueError("while logging") from inner
    except ValueError as outer:
        assert peer_failure(outer) == "connection"


def test_other_network_errors_are_not_a_lost_rank():
    assert peer_failure(ConnectionRefusedError("[Errno 111] Connection refused")) is None
    assert peer_failure(RuntimeError("HTTPSConnectionPool(host='huggingface.co'): Connection refused")) is None
    assert peer_failure(OSError("Broken pipe")) is None
    assert peer_failure(ValueError("data.seq_len must be ...")) is None


def test_exits_and_backend_words_are_said_plainly():
    assert describe_exit(-9).startswith("killed by SIGKILL")
    assert describe_exit(-15) == "killed by SIGTERM"
    assert describe_exit(1) == "exited with status 1"
    assert first_line(RuntimeError(GLOO_CLOSED + "\nmore")) == "RuntimeError: " + GLOO_CLOSED


def test_a_ranks_own_failure_is_told_to_its_peers_and_not_read_as_a_lost_rank(tmp_path):
    """Rank 1 fails with its own error (noted by FailureRecord before its process group goes):
    rank 0 finds it and says one line naming it; its own rank and an earlier run's notes are not
    counted; interruptions and a peer's connection error are not a rank's own failure."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ring_lightning.training.callbacks import FailureRecord
    from ring_lightning.sequence.faults import clear_failures, failed_peers, peer_failed_message

    run = str(tmp_path)
    record = FailureRecord(run)
    record.on_exception(SimpleNamespace(global_rank=0), None, SIGTERMException())
    record.on_exception(SimpleNamespace(global_rank=0), None, RuntimeError(GLOO_CLOSED))
    assert failed_peers(run, rank=1, wait_s=0) == []
    record.on_exception(SimpleNamespace(global_rank=1), None, ValueError("bad batch\nmore"))
    assert failed_peers(run, rank=1, wait_s=0) == []  # its own note
    failed = failed_peers(run, rank=0, wait_s=0)
    assert failed == [(1, "ValueError: bad batch")]
    assert peer_failed_message(0, failed) == "rank 0: stopping because rank 1 (ValueError) failed; its own report is above."
    clear_failures(run)
    assert failed_peers(run, rank=0, wait_s=0) == []


def test_the_same_error_on_every_rank_is_reported_by_the_lowest_one(tmp_path):
    from types import SimpleNamespace

    from ring_lightning.training.callbacks import FailureRecord
    from ring_lightning.sequence.faults import same_error_elsewhere

    error = RuntimeError("shape mismatch in my module")
    FailureRecord(str(tmp_path)).on_exception(SimpleNamespace(global_rank=0), None, error)
    assert same_error_elsewhere(str(tmp_path), 1, RuntimeError("shape mismatch in my module"), wait_s=0) == 0
    assert same_error_elsewhere(str(tmp_path), 1, ValueError("another one"), wait_s=0) is None
