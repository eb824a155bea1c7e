"""The shard command lines, and the process plumbing shared by every child of the launcher.

A `Child` is one process in its own session (so a signal reaches everything it started) whose output
is copied to our stderr line by line, prefixed with its name (or as JSON records: `logs.child_line`).
A `Supervisor` owns the children: it waits for shard sockets, blocks until any child fails (exits, or
stays stopped: SIGSTOP, a frozen cgroup) or a stop is requested, and stops them all.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import IO, TypeVar

from tgi_launcher.config import LauncherConfig, num_visible_gpus
from tgi_launcher.logs import child_line
from tgi_proto.settings import PrepareSettings, env_of, to_argv

log = logging.getLogger("tgi_launcher")
T = TypeVar("T")

# Seconds a child gets to exit after SIGTERM before SIGKILL (the launcher passes its own,
# --graceful-termination-timeout); the router drains in-flight requests for a little less.
STOP_GRACE_SECONDS = 30.0
# After a child failed nothing is left to finish: the others get this long after SIGTERM. A shard
# blocked in a collective with a dead peer exits on SIGTERM at once (tgi_server.cli), so this only
# bounds the exit of something broken.
FAILED_STOP_GRACE_SECONDS = 5.0
# A child stopped this long (process state T) counts as hung: it answers nothing, and a shard
# stopped in the middle of a step blocks every other shard in the step's next collective.
HUNG_SECONDS = 3.0
POLL_SECONDS = 0.1
# How often a slow shard start is reported.
WAITING_LOG_SECONDS = 10.0
NUM_TAIL_LINES = 40

_output_lock = threading.Lock()
_PR_SET_PDEATHSIG = 1
# libc, loaded before any fork: the child between fork and exec may only make the prctl call.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent_pid: int):
    """A preexec_fn: the child gets SIGKILL when the launcher dies, even by SIGKILL (Linux only), so
    no shard or router outlives it. The signal follows the thread that forks; children are only
    started from the launcher's main thread."""

    def preexec():
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the launcher died before prctl
            os._exit(1)

    return preexec if _libc is not None else None


def prepare_argv(settings: PrepareSettings) -> list[str]:
    """`tgi_server prepare`: resolves a model to local files; prints JSON as its last stdout line."""
    return [sys.executable, "-m", "tgi_server", "prepare", *to_argv(settings)]


def shard_argv(config: LauncherConfig, model_path: str, rank: int, replica: int = 0) -> list[str]:
    """`tgi_server serve` for one rank (of data-parallel replica `replica`); the shard binds
    `{shard_uds_path}-{rank}` once its model is loaded."""
    settings = dataclasses.replace(config.replica_shard(replica), model_path=model_path, rank=rank)
    return [sys.executable, "-m", "tgi_server", "serve", *to_argv(settings)]


def shard_env(config: LauncherConfig, rank: int, replica: int = 0) -> dict[str, str]:
    """The variables torch.distributed reads, the shard secret (kept out of argv, which `ps` shows), the
    replica's GPUs (each replica sees its own) and the hub cache if set, on top of the launcher's environment."""
    shard = config.replica_shard(replica)
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % shard.num_local_shards),
        "WORLD_SIZE": str(config.num_shard),
        "MASTER_ADDR": shard.master_addr,
        "MASTER_PORT": str(shard.master_port),
        **env_of(shard),
    }
    if config.num_replicas > 1 and num_visible_gpus():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [gpu.strip() for gpu in visible.split(",")] if visible else [str(i) for i in range(num_visible_gpus())]
        first = (replica - config.local_replicas.start) * shard.num_shard  # this node's replicas, in order
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[first : first + shard.num_shard])
    if config.huggingface_hub_cache is not None:
        env["HUGGINGFACE_HUB_CACHE"] = config.huggingface_hub_cache
    return env


class StartupError(RuntimeError):
    """A shard died or timed out before it was ready; the message names it."""


@dataclass(eq=False)
class Child:
    """A named child process; its stdout and stderr are forwarded to our stderr as `[name] line`
    (as JSON records with `json_output`); stderr is only kept in `stderr_tail` unless
    `is_stderr_forwarded`."""

    name: str
    process: subprocess.Popen
    json_output: bool = False
    is_stderr_forwarded: bool = True
    stdout_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=NUM_TAIL_LINES))
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=NUM_TAIL_LINES))
    _readers: list[threading.Thread] = field(default_factory=list, repr=False)
    _stopped_since: float | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls, name: str, argv: list[str], env: dict[str, str] | None = None, *,
        json_output: bool = False, is_stderr_forwarded: bool = True,
    ) -> Child:
        """Starts `argv` with the launcher's environment plus `env`, unbuffered so lines arrive live."""
        process = subprocess.Popen(
            argv,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
            text=True,
            errors="replace",
        )
        child = cls(name, process, json_output, is_stderr_forwarded)
        outputs = ((process.stdout, child.stdout_tail, True), (process.stderr, child.stderr_tail, is_stderr_forwarded))
        for stream, tail, is_forwarded in outputs:
            reader = threading.Thread(target=child._forward, args=(stream, tail, is_forwarded), daemon=True)
            reader.start()
            child._readers.append(reader)
        return child

    def _forward(self, stream: IO[str], tail: collections.deque, is_forwarded: bool) -> None:
        for line in stream:
            text = line.rstrip("\n")
            tail.append(text)
            if is_forwarded:
                with _output_lock:
                    sys.stderr.write(child_line(self.name, text, self.json_output) + "\n")
                    sys.stderr.flush()

    @property
    def exit_code(self) -> int | None:
        """None while it runs; negative when a signal ended it."""
        return self.process.poll()

    def failure(self) -> str | None:
        """Why this child no longer serves ("terminated with exit code -9 (SIGKILL)", "is stopped ..."),
        or None while it runs. Polled: a stop counts once it has lasted `HUNG_SECONDS`."""
        code = self.exit_code
        if code is not None:
            return f"terminated with exit code {describe_exit(code)}"
        if _process_state(self.process.pid) not in ("T", "t"):
            self._stopped_since = None
            return None
        now = time.monotonic()
        if self._stopped_since is None:
            self._stopped_since = now
        if now - self._stopped_since < HUNG_SECONDS:
            return None
        return f"is stopped (SIGSTOP or a debugger) and has not answered for {now - self._stopped_since:.0f} s"

    def signal(self, signum: int) -> None:
        """Sends `signum` to the child's whole process group, if the child still runs."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def join_output(self, timeout: float = 1.0) -> None:
        """Waits (briefly: a grandchild may hold the pipes open) until its last lines are forwarded."""
        for reader in self._readers:
            reader.join(timeout)


def describe_exit(code: int) -> str:
    """`3`, or `-9 (SIGKILL)` for a child ended by a signal."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T, Z, ...); None where there is no procfs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :][:1].decode()


def stop(children: list[Child], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to every running child at once, then SIGKILL to those still running after `grace` s."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", child.name, grace)
            child.signal(signal.SIGKILL)
            child.process.wait()


class Supervisor:
    """Owns the launcher's children. Thread-safe `request_stop()` (e.g. from a signal handler) makes
    every wait return early."""

    def __init__(self, grace: float = STOP_GRACE_SECONDS, json_output: bool = False):
        self.children: list[Child] = []
        self.grace = grace
        self.json_output = json_output
        self._stop_requested = threading.Event()
        # Functions giving more things to watch like children (`name`, `failure()`): other nodes' launchers.
        self._watched: list[Callable[[], list]] = []

    def watch(self, source: Callable[[], list]) -> None:
        """Makes whatever `source()` returns (then and later) count as children in `first_failed`."""
        self._watched.append(source)

    def pause(self, seconds: float) -> bool:
        """Sleeps up to `seconds`; True (at once) when a stop was requested."""
        return self._stop_requested.wait(seconds)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child.start(name, argv, env, json_output=self.json_output)
        self.children.append(child)
        return child

    def request_stop(self) -> None:
        self._stop_requested.set()

    @property
    def is_stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def run_to_completion(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, is_stderr_forwarded: bool = True
    ) -> Child | None:
        """Runs a one-off command; returns it once it exited, or None (after stopping it) on a stop."""
        child = Child.start(name, argv, env, json_output=self.json_output, is_stderr_forwarded=is_stderr_forwarded)
        while child.exit_code is None:
            if self._stop_requested.wait(POLL_SECONDS):
                stop([child], self.grace)
                return None
        child.join_output()
        return child

    def wait_until_ready(self, child_to_socket: dict[Child, str], timeout: float) -> None:
        """Blocks until each child's socket file exists or a stop is requested. Raises StartupError if
        any child exits first, or a socket is still missing after `timeout` seconds."""
        started = time.monotonic()
        next_report = started + WAITING_LOG_SECONDS
        pending = dict(child_to_socket)
        while pending and not self.is_stop_requested:
            for child, path in list(pending.items()):
                if os.path.exists(path):
                    log.info("%s ready in %.1f s", child.name.capitalize(), time.monotonic() - started)
                    del pending[child]
            dead = self.first_failed()
            if dead is not None:
                if dead.exit_code is None:  # hung
                    reason = dead.failure()
                else:  # its last error line usually says why (tgi_server logs one for a bad checkpoint)
                    dead.join_output()
                    last_line = next((line for line in reversed(dead.stderr_tail) if line.strip()), "")
                    reason = f"exited with code {describe_exit(dead.exit_code)}" + (f": {last_line}" if last_line else "")
                raise StartupError(f"{dead.name.capitalize()} failed to start: {reason}")
            now = time.monotonic()
            if pending and now - started > timeout:
                names = ", ".join(child.name for child in pending)
                raise StartupError(f"{names} not ready after {timeout:g} s (no socket at {', '.join(pending.values())})")
            if pending and now >= next_report:
                log.info("waiting for %s to be ready...", ", ".join(child.name for child in pending))
                next_report = now + WAITING_LOG_SECONDS
            self._stop_requested.wait(POLL_SECONDS)

    def wait_for(self, get: Callable[[], T | None], timeout: float, missing: Callable[[], str]) -> T | None:
        """Polls `get()` until it gives something, which it returns; None once a stop is requested.
        StartupError if a child fails first, or after `timeout` seconds (naming `missing()`)."""
        started = time.monotonic()
        while not self.is_stop_requested:
            value = get()
            if value is not None:
                return value
            dead = self.first_failed()
            if dead is not None:
                raise StartupError(f"{dead.name.capitalize()} {dead.failure()}")
            if time.monotonic() - started > timeout:
                raise StartupError(f"{missing()} not ready after {timeout:g} s")
            self._stop_requested.wait(POLL_SECONDS)
        return None

    def first_failed(self) -> Child | None:
        """The first child (or watched thing) that exited or hangs (see `Child.failure`), if any."""
        watched = [item for source in self._watched for item in source()]
        return next((child for child in [*self.children, *watched] if child.failure() is not None), None)

    def wait(self) -> Child | None:
        """Blocks until a child fails (returns it; `failure()` says how) or a stop is requested
        (returns None)."""
        while not self.is_stop_requested:
            failed = self.first_failed()
            if failed is not None:
                return failed
            self._stop_requested.wait(POLL_SECONDS)
        return None

    def shutdown(self, first: Child | None = None) -> None:
        """Stops every child: `first` alone before the others (the router before the shards, so it
        does not see its shards vanish under in-flight requests), the rest all at once."""
        if first is not None:
            stop([first], self.grace)
        stop(self.children, self.grace)
        for child in self.children:
            child.join_output()

    def abort(self, failed: Child) -> None:
        """Stops everything after `failed` exited or hung: it gets SIGKILL if it is still there (a
        stopped process acts on nothing else; its death fails the router's calls to it, so the
        clients get their errors), the others SIGTERM and `FAILED_STOP_GRACE_SECONDS` at most."""
        failed.signal(signal.SIGKILL)
        stop(self.children, min(self.grace, FAILED_STOP_GRACE_SECONDS))
        for child in self.children:
            child.join_output()


def remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
