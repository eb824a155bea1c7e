"""Launcher supervision with fake children: no model, no torch, a few seconds in all.

The `Supervisor` is driven in-process with `python -c` children. The whole launcher runs as a real
`python -m tgi_launcher` subprocess whose `tgi_server` and `tgi_router` are small fakes put first on
PYTHONPATH: they record their argv and environment, bind the shard sockets, and die on request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tgi_launcher.shards import HUNG_SECONDS, StartupError, Supervisor

# ---------------------------------------------------------------- in-process Supervisor, `python -c` children

BIND_THEN_SLEEP = """
import socket, sys, time
time.sleep(float(sys.argv[2]))
socket.socket(socket.AF_UNIX).bind(sys.argv[1])
time.sleep(60)
"""


def python(code: str, *args) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def short_dir():
    """A directory with a short path: a Unix socket path must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="tgi-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def supervisor():
    supervisor = Supervisor(grace=2.0)
    yield supervisor
    supervisor.shutdown()


def test_wait_until_ready_returns_once_every_socket_exists(supervisor, short_dir):
    paths = [str(short_dir / "s-0"), str(short_dir / "s-1")]
    children = [supervisor.start(f"shard {rank}", python(BIND_THEN_SLEEP, path, 0.2 * (rank + 1)))
                for rank, path in enumerate(paths)]
    started = time.monotonic()
    supervisor.wait_until_ready(dict(zip(children, paths)), timeout=10)
    assert time.monotonic() - started >= 0.4
    assert all(os.path.exists(path) for path in paths)
    assert all(child.exit_code is None for child in children)


def test_wait_until_ready_names_the_shard_that_is_late(supervisor, short_dir):
    paths = [str(short_dir / "s-0"), str(short_dir / "s-1")]
    ready = supervisor.start("shard 0", python(BIND_THEN_SLEEP, paths[0], 0))
    late = supervisor.start("shard 1", python("import time; time.sleep(60)"))
    with pytest.raises(StartupError, match="shard 1 not ready after 0.5 s") as error:
        supervisor.wait_until_ready({ready: paths[0], late: paths[1]}, timeout=0.5)
    assert "shard 0" not in str(error.value)


def test_wait_until_ready_names_the_shard_that_died_while_loading(supervisor, short_dir):
    paths = [str(short_dir / "s-0"), str(short_dir / "s-1")]
    loading = supervisor.start("shard 0", python(BIND_THEN_SLEEP, paths[0], 30))
    dying = supervisor.start("shard 1", python("import sys, time; time.sleep(0.2); sys.exit(3)"))
    started = time.monotonic()
    with pytest.raises(StartupError, match="Shard 1 failed to start: exited with code 3"):
        supervisor.wait_until_ready({loading: paths[0], dying: paths[1]}, timeout=60)
    assert time.monotonic() - started < 5


def test_wait_returns_the_child_that_died_and_shutdown_stops_the_others(supervisor):
    survivors = [supervisor.start(f"shard {rank}", python("import time; time.sleep(60)")) for rank in range(2)]
    victim = supervisor.start("router", python("import sys, time; time.sleep(0.3); sys.exit(9)"))
    started = time.monotonic()
    assert supervisor.wait() is victim
    assert time.monotonic() - started < 5 and victim.exit_code == 9
    supervisor.shutdown()
    assert [child.exit_code for child in survivors] == [-signal.SIGTERM, -signal.SIGTERM]
    assert time.monotonic() - started < 5


def test_a_stopped_child_fails_after_the_hung_delay_and_abort_kills_it(supervisor):
    survivor = supervisor.start("shard 0", python("import time; time.sleep(60)"))
    victim = supervisor.start("shard 1", python("import time; time.sleep(60)"))
    os.kill(victim.process.pid, signal.SIGSTOP)
    started = time.monotonic()
    assert supervisor.wait() is victim
    assert HUNG_SECONDS <= time.monotonic() - started < HUNG_SECONDS + 2
    assert victim.failure().startswith("is stopped")
    supervisor.abort(victim)
    assert victim.exit_code == -signal.SIGKILL and survivor.exit_code == -signal.SIGTERM
    assert time.monotonic() - started < HUNG_SECONDS + 3


def test_a_child_stopped_briefly_is_not_a_failure(supervisor):
    child = supervisor.start("shard 0", python("import time; time.sleep(60)"))
    os.kill(child.process.pid, signal.SIGSTOP)
    time.sleep(HUNG_SECONDS / 2)
    assert child.failure() is None
    os.kill(child.process.pid, signal.SIGCONT)
    assert wait_until(lambda: child.failure() is None and open(f"/proc/{child.process.pid}/stat").read().split(") ")[1][0] != "T")
    os.kill(child.process.pid, signal.SIGSTOP)  # a second stop: its clock starts again
    time.sleep(HUNG_SECONDS * 0.75)
    assert child.failure() is None


def test_request_stop_makes_every_wait_return(supervisor, short_dir):
    child = supervisor.start("shard 0", python("import time; time.sleep(60)"))
    threading.Timer(0.2, supervisor.request_stop).start()
    supervisor.wait_until_ready({child: str(short_dir / "never")}, timeout=60)  # returns, no error
    assert supervisor.wait() is None
    assert supervisor.run_to_completion("prepare", python("import time; time.sleep(60)")) is None


def test_child_ignoring_sigterm_is_killed_after_the_grace_period():
    supervisor = Supervisor(grace=0.5)
    stubborn = supervisor.start("shard 0", python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(60)
    """))
    assert wait_until(lambda: "ignoring SIGTERM" in stubborn.stdout_tail)
    started = time.monotonic()
    supervisor.shutdown()
    assert stubborn.exit_code == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 3


def test_shutdown_reaches_the_grandchildren_too(supervisor):
    parent = supervisor.start("shard 0", python("""
        import subprocess, time
        print(subprocess.Popen(["sleep", "60"]).pid, flush=True)
        time.sleep(60)
    """))
    assert wait_until(lambda: len(parent.stdout_tail) == 1)
    grandchild = int(parent.stdout_tail[0])
    assert is_alive(grandchild)
    supervisor.shutdown()
    assert wait_until(lambda: not is_alive(grandchild))


def test_child_output_is_forwarded_line_by_line_with_its_name(supervisor, capsys):
    child = supervisor.run_to_completion("shard 0", python("""
        import sys
        print("loading weights")
        print("low memory", file=sys.stderr)
        print("no newline at the end", end="")
    """))
    assert child.exit_code == 0
    assert list(child.stdout_tail) == ["loading weights", "no newline at the end"]
    assert list(child.stderr_tail) == ["low memory"]
    err = capsys.readouterr().err
    for line in ("[shard 0] loading weights\n", "[shard 0] low memory\n", "[shard 0] no newline at the end\n"):
        assert line in err


# ---------------------------------------------------------------- the real launcher with fake children

FAKE_SERVER = """
import json, os, signal, socket, sys, time

def record(name, **extra):
    path = os.path.join(os.environ["FAKE_RECORD_DIR"], name + ".json")
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    data = {"argv": sys.argv[1:], "pid": os.getpid(), "env": {k: os.environ.get(k) for k in keys}, **extra}
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)

def on_sigterm(name):
    def handler(*_):
        record(name + "-stopped", at=time.monotonic())
        sys.exit(0)
    signal.signal(signal.SIGTERM, handler)

command = sys.argv[1]
if command == "prepare":
    if os.environ.get("FAKE_PREPARE_FAIL"):
        print("Traceback: no such model " + sys.argv[2], file=sys.stderr)
        sys.exit(3)
    print("fetching " + sys.argv[2])
    print(json.dumps({"model_path": "/fake/model", "tokenizer_path": "/fake/tokenizer"}))
    sys.exit(0)
from tgi_proto.settings import ShardSettings, parse_argv
settings = parse_argv(ShardSettings, sys.argv[2:])
rank, uds = settings.rank, settings.shard_uds_path
name = "shard-%d" % rank
on_sigterm(name)
print("loading the model on rank %d" % rank)
time.sleep(0.1 * rank)
socket.socket(socket.AF_UNIX).bind("%s-%d" % (uds, rank))
record(name)
if os.environ.get("FAKE_DIE_RANK") == str(rank):
    while not os.path.exists(os.path.join(os.environ["FAKE_RECORD_DIR"], "router.json")):
        time.sleep(0.02)
    time.sleep(0.3)
    record("death", at=time.monotonic())
    print("CUDA error: an illegal memory access was encountered", file=sys.stderr, flush=True)
    os._exit(7)
while True:
    time.sleep(1)
"""

FAKE_ROUTER = """
import glob, json, os, signal, sys, time
record_dir = os.environ["FAKE_RECORD_DIR"]
uds = sys.argv[sys.argv.index("--shard-uds-path") + 1]

def stop(*_):
    time.sleep(0.3)  # a graceful shutdown takes a moment; the shards must still be up meanwhile
    with open(os.path.join(record_dir, "router-stopped.json"), "w") as f:
        json.dump({"at": time.monotonic()}, f)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
data = {"argv": sys.argv[1:], "pid": os.getpid(), "sockets": sorted(glob.glob(uds + "-*"))}
with open(os.path.join(record_dir, "router.json.tmp"), "w") as f:
    json.dump(data, f)
os.replace(os.path.join(record_dir, "router.json.tmp"), os.path.join(record_dir, "router.json"))
if os.environ.get("FAKE_ROUTER_EXIT"):
    time.sleep(0.3)
    os._exit(int(os.environ["FAKE_ROUTER_EXIT"]))
while True:
    time.sleep(1)
"""

TGI_ENV_VARS = ("MODEL_ID", "REVISION", "NUM_SHARD", "DTYPE", "HOSTNAME", "PORT", "SHARD_UDS_PATH", "MASTER_ADDR",
                "MASTER_PORT", "MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH", "MAX_TOTAL_TOKENS", "MAX_BATCH_SIZE",
                "MAX_BATCH_PREFILL_TOKENS", "MAX_BATCH_TOTAL_TOKENS", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    """A PYTHONPATH entry holding fake `tgi_server` and `tgi_router` packages."""
    root = tmp_path_factory.mktemp("fakes")
    for package, source in (("tgi_server", FAKE_SERVER), ("tgi_router", FAKE_ROUTER)):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
        (root / package / "__main__.py").write_text(textwrap.dedent(source))
    return root


class Launcher:
    """`python -m tgi_launcher` running the fakes; its stderr goes to a log file."""

    def __init__(self, fakes: Path, workdir: Path, *args: str, **fake_env: str):
        self.records = workdir / f"records-{id(self)}"
        self.records.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in TGI_ENV_VARS}
        env.update(PYTHONPATH=os.pathsep.join([str(fakes), env.get("PYTHONPATH", "")]),
                   FAKE_RECORD_DIR=str(self.records), CUDA_VISIBLE_DEVICES="", **fake_env)
        self.log_path = workdir / f"launcher-{id(self)}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tgi_launcher", "--model-id", "org/fake", *args],
                                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def record(self, name: str) -> dict:
        return json.loads((self.records / f"{name}.json").read_text())

    def wait_ready(self, timeout: float = 15) -> None:
        ready = wait_until(lambda: (self.records / "router.json").exists() or self.process.poll() is not None, timeout)
        assert ready and self.process.poll() is None, self.log

    def child_pids(self) -> list[int]:
        return [self.record(path.stem)["pid"] for path in self.records.glob("*.json")
                if path.stem.startswith(("shard-", "router")) and "stopped" not in path.stem]

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.child_pids():
            if is_alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def launch(fakes, short_dir):
    launchers = []

    def start(*args: str, **fake_env: str) -> Launcher:
        launchers.append(Launcher(fakes, short_dir, *args, **fake_env))
        return launchers[-1]

    yield start
    for launcher in launchers:
        launcher.kill()


def test_children_get_the_argv_and_env_contract(launch, short_dir):
    uds = str(short_dir / "sock")
    launcher = launch("--num-shard", "2", "--shard-uds-path", uds, "--master-port", "29777", "--dtype", "float16",
                      "--max-total-tokens", "512", "--port", "8123", "--hostname", "127.0.0.1")
    launcher.wait_ready()
    assert "[prepare] fetching org/fake" in launcher.log and "[shard 1] loading the model on rank 1" in launcher.log
    for rank in range(2):
        shard = launcher.record(f"shard-{rank}")
        assert shard["argv"] == ["serve", "/fake/model", *(["--rank", "1"] if rank else []), "--num-shard", "2",
                                 "--shard-uds-path", uds, "--master-port", "29777", "--dtype", "float16"]
        assert shard["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                "MASTER_ADDR": "localhost", "MASTER_PORT": "29777"}
    router = launcher.record("router")
    assert router["sockets"] == [f"{uds}-0", f"{uds}-1"]  # started only once both shards were ready
    assert router["argv"] == [
        "--tokenizer-path", "/fake/tokenizer", "--model-id", "org/fake", "--shard-uds-path", uds, "--num-shard", "2",
        "--hostname", "127.0.0.1", "--port", "8123", "--max-total-tokens", "512", "--drain-timeout", "85.0",
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_router_then_the_shards_and_exits_zero(launch, short_dir, signum):
    uds = str(short_dir / "sock")
    launcher = launch("--num-shard", "2", "--shard-uds-path", uds)
    launcher.wait_ready()
    pids = launcher.child_pids()
    launcher.process.send_signal(signum)
    assert launcher.process.wait(timeout=15) == 0, launcher.log
    router_stopped = launcher.record("router-stopped")["at"]
    assert all(launcher.record(f"shard-{rank}-stopped")["at"] > router_stopped for rank in range(2))
    assert list(short_dir.glob("sock-*")) == []
    assert not any(is_alive(pid) for pid in pids)


def test_dead_shard_stops_everything_within_5_seconds_and_is_named(launch, short_dir):
    uds = str(short_dir / "sock")
    launcher = launch("--num-shard", "3", "--shard-uds-path", uds, FAKE_DIE_RANK="1")
    launcher.wait_ready()
    pids = launcher.child_pids()
    code = launcher.process.wait(timeout=15)
    exited = time.monotonic()
    assert code != 0
    assert exited - launcher.record("death")["at"] < 5
    assert "Shard 1 terminated with exit code 7" in launcher.log
    assert "[shard 1] CUDA error: an illegal memory access was encountered" in launcher.log
    assert list(short_dir.glob("sock-*")) == []
    assert not any(is_alive(pid) for pid in pids)


def test_dead_router_stops_the_shards(launch, short_dir):
    launcher = launch("--num-shard", "2", "--shard-uds-path", str(short_dir / "sock"), FAKE_ROUTER_EXIT="5")
    launcher.wait_ready()
    pids = launcher.child_pids()
    assert launcher.process.wait(timeout=15) != 0
    assert "Router terminated with exit code 5" in launcher.log
    assert list(short_dir.glob("sock-*")) == []
    assert not any(is_alive(pid) for pid in pids)


def test_children_die_with_a_launcher_killed_by_sigkill(launch, short_dir):
    launcher = launch("--num-shard", "2", "--shard-uds-path", str(short_dir / "sock"))
    launcher.wait_ready()
    pids = launcher.child_pids()
    assert len(pids) == 3
    os.kill(launcher.process.pid, signal.SIGKILL)  # the launcher alone: each child has a session of its own
    launcher.process.wait()
    assert wait_until(lambda: not any(is_alive(pid) for pid in pids))


def test_failed_prepare_exits_nonzero_with_its_error_output(launch):
    launcher = launch(FAKE_PREPARE_FAIL="1")
    assert launcher.process.wait(timeout=15) != 0
    assert "Could not prepare org/fake (exit code 3)" in launcher.log
    assert "Traceback: no such model org/fake" in launcher.log
    assert launcher.child_pids() == []


def test_a_port_in_use_stops_the_launcher_before_anything_is_loaded(launch):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launcher = launch("--hostname", "127.0.0.1", "--port", str(port))
        assert launcher.process.wait(timeout=15) != 0
    assert f"Cannot serve on 127.0.0.1:{port}" in launcher.log and "in use" in launcher.log
    assert "Preparing" not in launcher.log and launcher.child_pids() == []


def test_json_output_makes_every_line_a_json_record_child_lines_included(launch, short_dir):
    launcher = launch("--num-shard", "2", "--shard-uds-path", str(short_dir / "sock"), "--json-output")
    launcher.wait_ready()
    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.process.wait(timeout=15) == 0, launcher.log
    records = [json.loads(line) for line in launcher.log.splitlines()]  # fails on any non-JSON line
    assert all(record.keys() == {"timestamp", "level", "message", "target"} for record in records)
    targets = {record["target"] for record in records}
    assert {"text_generation_launcher", "prepare", "shard 0", "shard 1"} <= targets
    assert {"target": "shard 1", "level": "INFO", "message": "loading the model on rank 1"}.items() <= next(
        record for record in records if record["target"] == "shard 1").items()


def test_two_launchers_side_by_side_do_not_collide(launch):
    first, second = launch("--num-shard", "2"), launch("--num-shard", "2")
    first.wait_ready()
    second.wait_ready()
    uds_paths = {launcher.record("router")["argv"][5] for launcher in (first, second)}
    master_ports = {launcher.record("shard-0")["env"]["MASTER_PORT"] for launcher in (first, second)}
    assert len(uds_paths) == 2 and len(master_ports) == 2
    for launcher in (first, second):
        launcher.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=15) == 0 and second.process.wait(timeout=15) == 0
    for uds in uds_paths:
        assert not any(os.path.exists(f"{uds}-{rank}") for rank in range(2))
