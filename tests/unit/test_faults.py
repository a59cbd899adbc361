"""Reading a lost rank from the backend's errors: only collective errors count, connection
closed and timed out told apart; how a process ended, in words."""

import torch.distributed as dist

from ring_lightning.attention.comm import RingCommunicationError
from ring_lightning.faults import describe_exit, first_line, peer_failure

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
