"""The launchers of a multi-node deployment, linked to node 0's over TCP (on `master_port + 1`).

Node 0's launcher runs the router, which needs the gRPC address of every shard on the other nodes; and
every launcher must learn at once when another is gone: torch.distributed notices a dead peer only in
its next collective, which an idle server never runs. So the launcher of each node k > 0 holds one TCP
connection to node 0's (`NodeLink`), over which it sends JSON lines: `hello` (its node rank, and an HMAC
of it under the shard secret, so a stranger cannot join), then its shards' ports once they serve. Node
0's `NodeHub` takes each node's host from the connection itself. A connection that closes is a node
gone, on either end; a launcher that stops on purpose first says `stop` with its reason, and the others
stop for the same reason. TCP keepalive finds a host that vanished without closing anything.

Both ends are watched by the launcher's `Supervisor` like its children (`name`, `failure()`), so a node
gone stops the deployment exactly as a dead shard does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("tgi_launcher")

# TCP keepalive: a peer host that stops answering is found within about IDLE + INTERVAL * COUNT seconds.
KEEPALIVE_IDLE_SECONDS, KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_COUNT = 3, 1, 3
CONNECT_RETRY_SECONDS = 0.5
WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "")


class NodeError(RuntimeError):
    """A node could not join (refused, or node 0 never answered); the message says why."""


def link_port(master_port: int) -> int:
    """Where node 0's launcher listens for the others: beside torch.distributed's rendezvous port."""
    return master_port + 1


def _proof(secret: str, node_rank: int) -> str:
    return hmac.new(secret.encode(), f"tgi-py node {node_rank}".encode(), hashlib.sha256).hexdigest()


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _Connection:
    """One end of a node link: JSON lines each way, a reader thread, and what the other end said last."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self.reader = sock.makefile("r", encoding="utf-8")
        self.host = sock.getpeername()[0]
        self.stop_reason: str | None = None  # the other end's `stop`
        self.is_clean_stop = False  # the other end stopped on request: nothing failed
        self.is_closed = False
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        with self._lock:
            try:
                self.sock.sendall((json.dumps(message) + "\n").encode())
            except OSError:
                pass  # it is gone: the reader sees it

    def receive(self) -> dict | None:
        """The next message, or None once the connection closed (or sent something that is not one)."""
        try:
            line = self.reader.readline()
            return json.loads(line) if line else None
        except (OSError, ValueError):
            return None

    def follow(self, on_message=None) -> None:
        """Reads until the connection closes (in its own thread): `stop` is kept, anything else handed on."""
        def read():
            while (message := self.receive()) is not None:
                if "stop" in message:
                    self.stop_reason, self.is_clean_stop = str(message["stop"]), message.get("failed") is False
                elif on_message is not None:
                    on_message(message)
            self.is_closed = True

        threading.Thread(target=read, name=f"link {self.name}", daemon=True).start()

    def failure(self) -> str | None:
        """Why the node at the other end no longer serves, or None (the `Supervisor`'s child protocol)."""
        if self.stop_reason is not None:  # what it did: "stopped on request", "stopped: shard 2 terminated ..."
            return self.stop_reason
        if self.is_closed:
            return "went away (its launcher's connection closed: the launcher or its host died)"
        return None

    def close(self, reason: str, is_failure: bool = True) -> None:
        """Tells the other end why this node stops (`reason`; `is_failure`: not on request), then hangs up."""
        self.send({"stop": reason, "failed": is_failure})
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # The rest of the child protocol: a node is not a process of ours.
    exit_code = None

    def signal(self, signum: int) -> None:
        pass

    def join_output(self, timeout: float = 1.0) -> None:
        pass


@dataclass
class _Node:
    connection: _Connection
    shard_addresses: list[str] | None = None


@dataclass
class NodeHub:
    """Node 0's end: accepts the other nodes' launchers and collects their shards' addresses."""

    num_nodes: int
    secret: str
    port: int
    nodes: dict[int, _Node] = field(default_factory=dict)
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> NodeHub:
        self._listener = socket.create_server(("", self.port), reuse_port=False)
        threading.Thread(target=self._accept, name="node hub", daemon=True).start()
        log.info("Waiting for nodes 1 to %d on port %d", self.num_nodes - 1, self.port)
        return self

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            _keepalive(sock)
            threading.Thread(target=self._greet, args=(sock,), daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        connection = _Connection(sock, "node ?")
        hello = connection.receive() or {}
        node_rank = hello.get("hello")
        refusal = None
        if not isinstance(node_rank, int) or not 0 < node_rank < self.num_nodes:
            refusal = f"node rank {node_rank!r} is not in 1..{self.num_nodes - 1} (--nnodes {self.num_nodes})"
        elif not hmac.compare_digest(str(hello.get("proof", "")), _proof(self.secret, node_rank)):
            refusal = "wrong shard secret (SHARD_SECRET must be the same on every node)"
        with self._lock:
            if refusal is None and node_rank in self.nodes:
                refusal = f"node {node_rank} has joined already"
            if refusal is None:
                connection.name = f"node {node_rank}"
                self.nodes[node_rank] = _Node(connection)
        if refusal is not None:
            log.error("Refused a launcher from %s: %s", connection.host, refusal)
            connection.close(f"refused by node 0: {refusal}")
            return
        log.info("Node %d joined from %s", node_rank, connection.host)
        connection.send({"welcome": node_rank})
        connection.follow(lambda message: self._on_message(node_rank, message))

    def _on_message(self, node_rank: int, message: dict) -> None:
        addresses = message.get("shards")
        if isinstance(addresses, list) and all(isinstance(address, str) for address in addresses):
            node = self.nodes[node_rank]
            # A shard bound to every interface is reached at the address its launcher connected from.
            node.shard_addresses = [address if address.rpartition(":")[0] not in WILDCARD_HOSTS
                                    else f"{_host(node.connection.host)}:{address.rpartition(':')[2]}"
                                    for address in addresses]
            log.info("Node %d's shards serve on %s", node_rank, ", ".join(node.shard_addresses))

    @property
    def peers(self) -> list[_Connection]:
        with self._lock:
            return [node.connection for node in self.nodes.values()]

    def shard_targets(self) -> list[str] | None:
        """The gRPC targets of the other nodes' shards in rank order, once every node reported them."""
        with self._lock:
            nodes = [self.nodes.get(rank) for rank in range(1, self.num_nodes)]
        if any(node is None or node.shard_addresses is None for node in nodes):
            return None
        return [address for node in nodes for address in node.shard_addresses]

    def missing(self) -> list[str]:
        """The nodes not (fully) there yet, for a log line."""
        with self._lock:
            return [f"node {rank}" + (" (shards not ready)" if rank in self.nodes else "")
                    for rank in range(1, self.num_nodes)
                    if rank not in self.nodes or self.nodes[rank].shard_addresses is None]

    def close(self, reason: str, is_failure: bool = True) -> None:
        if self._listener is not None:
            self._listener.close()
        for peer in self.peers:
            peer.close(reason, is_failure)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def join(master_addr: str, port: int, node_rank: int, secret: str, timeout: float,
         pause: Callable[[float], bool]) -> _Connection:
    """Node k > 0's end: connects to node 0's launcher (retrying while it starts: nodes start in any order)
    and is welcomed. NodeError when refused or after `timeout` seconds without node 0."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((master_addr, port), timeout=5)
            break
        except OSError as error:
            if time.monotonic() > deadline:
                raise NodeError(f"node 0's launcher at {master_addr}:{port} did not answer in {timeout:g} s "
                                f"({error}); is --master-addr node 0's address?") from None
            if pause(CONNECT_RETRY_SECONDS):  # True: a stop was requested
                raise NodeError("stop requested before node 0 answered") from None
    sock.settimeout(None)
    _keepalive(sock)
    connection = _Connection(sock, "node 0")
    connection.send({"hello": node_rank, "proof": _proof(secret, node_rank)})
    answer = connection.receive() or {}
    if answer.get("welcome") != node_rank:
        connection.sock.close()
        raise NodeError(str(answer.get("stop", "node 0's launcher closed the connection")))
    log.info("Joined node 0 at %s:%d as node %d", master_addr, port, node_rank)
    connection.follow()
    return connection


def report_shards(connection: _Connection, addresses: list[str]) -> None:
    """Tells node 0 where this node's shards serve (`HOST:PORT` as the shards wrote them)."""
    connection.send({"shards": addresses})
