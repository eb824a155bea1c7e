"""The launchers' link between nodes, in-process over localhost TCP: joining, refusals, the shards'
addresses node 0's router gets, and how each end learns that the other stopped or died."""

from __future__ import annotations

import socket
import time

import pytest

from tgi_launcher import nodes


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return predicate()


def never_stop(seconds: float) -> bool:
    time.sleep(seconds)
    return False


@pytest.fixture
def hub():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub = nodes.NodeHub(num_nodes=3, secret="s", port=port).start()
    yield hub
    hub.close("test over")


def join(hub: nodes.NodeHub, rank: int, secret: str = "s"):
    return nodes.join("127.0.0.1", hub.port, rank, secret, timeout=5, pause=never_stop)


def test_the_router_gets_every_other_nodes_shards_in_rank_order_once_all_reported(hub):
    second, first = join(hub, 2), join(hub, 1)
    nodes.report_shards(second, ["0.0.0.0:7002", "0.0.0.0:7003"])
    wait_until(lambda: "node 2" not in " ".join(hub.missing()))
    assert hub.shard_targets() is None and hub.missing() == ["node 1 (shards not ready)"]
    nodes.report_shards(first, ["10.1.2.3:7000", "[::]:7001"])  # a given host is kept; any-address is the link's
    assert wait_until(hub.shard_targets) == ["10.1.2.3:7000", "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    assert [peer.failure() for peer in hub.peers] == [None, None]


@pytest.mark.parametrize("rank, secret, reason", [
    (1, "guess", "refused by node 0: wrong shard secret"),
    (3, "s", "refused by node 0: node rank 3 is not in 1..2 (--nnodes 3)"),
])
def test_a_launcher_with_a_wrong_secret_or_rank_is_refused(hub, rank, secret, reason):
    with pytest.raises(nodes.NodeError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        join(hub, rank, secret)
    assert hub.peers == []


def test_a_second_launcher_claiming_a_joined_rank_is_refused(hub):
    join(hub, 1)
    with pytest.raises(nodes.NodeError, match="node 1 has joined already"):
        join(hub, 1)


def test_node_0_never_answering_is_an_error_after_the_timeout():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(nodes.NodeError, match="did not answer in 0.5 s"):
        nodes.join("127.0.0.1", port, 1, "s", timeout=0.5, pause=never_stop)
    assert time.monotonic() - started < 3


def test_node_0_stopping_tells_every_node_its_reason_and_that_nothing_failed(hub):
    link = join(hub, 1)
    hub.close("stopped on request", is_failure=False)
    assert wait_until(link.failure) == "stopped on request" and link.is_clean_stop


def test_a_node_stopping_after_a_failure_tells_node_0_why(hub):
    link = join(hub, 2)
    [peer] = wait_until(lambda: hub.peers)
    link.close("stopped: shard 5 terminated with exit code -9 (SIGKILL)")
    assert wait_until(peer.failure) == "stopped: shard 5 terminated with exit code -9 (SIGKILL)"
    assert not peer.is_clean_stop


def test_a_connection_closing_without_a_word_is_a_node_gone(hub):
    link = join(hub, 1)
    [peer] = wait_until(lambda: hub.peers)
    link.sock.shutdown(socket.SHUT_RDWR)  # as when the launcher is killed: the kernel closes its socket
    assert "went away" in wait_until(peer.failure)
