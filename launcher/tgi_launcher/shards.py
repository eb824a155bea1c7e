"""Child processes: start them, forward their logs, wait for readiness, stop them all together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

# Seconds a child gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS = 10


@dataclass
class Child:
    """A named child process whose output is copied to our stderr, line by line, with its name."""

    name: str
    process: subprocess.Popen
    _reader: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a stop reaches its children too
            text=True,
            errors="replace",
        )
        child = cls(name, process)
        child._reader = threading.Thread(target=child._forward_output, daemon=True)
        child._reader.start()
        return child

    def _forward_output(self) -> None:
        for line in self.process.stdout:
            sys.stderr.write(f"[{self.name}] {line}")
        sys.stderr.flush()

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass


def stop_all(children: list[Child], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to every child still running, then SIGKILL whatever is left after `grace` seconds."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            child.signal(signal.SIGKILL)
            child.process.wait()


def wait_for_sockets(
    children: list[Child], socket_paths: list[str], timeout: float, stop_requested: threading.Event
) -> None:
    """Waits until every child's socket exists, or a stop is requested. Raises RuntimeError naming a
    child that died or is late."""
    deadline = time.monotonic() + timeout
    pending = dict(zip(socket_paths, children))
    while pending and not stop_requested.is_set():
        for path, child in list(pending.items()):
            if os.path.exists(path):
                del pending[path]
            elif child.exit_code is not None:
                raise RuntimeError(f"{child.name} exited with code {child.exit_code} before it was ready")
        if pending and time.monotonic() > deadline:
            names = ", ".join(child.name for child in pending.values())
            raise RuntimeError(f"{names} not ready after {timeout:.0f} s")
        stop_requested.wait(0.1)


def wait_for_exit(children: list[Child], stop_requested: threading.Event, poll: float = 0.1) -> Child | None:
    """Blocks until a child exits (returns it) or a stop is requested (returns None)."""
    while not stop_requested.is_set():
        for child in children:
            if child.exit_code is not None:
                return child
        stop_requested.wait(poll)
    return None


def remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
