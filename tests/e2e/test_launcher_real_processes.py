"""The launcher supervises real shards and a real router (tiny random Llama on CPU)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import pytest
from server_helpers import Server, save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("sup") / "llama")


def start(tiny_llama, hf_home, uds, num_shard=1) -> Server:
    server = Server(str(tiny_llama), hf_home, "--max-batch-total-tokens", "4096", "--shard-uds-path", uds,
                    num_shard=num_shard)
    server.wait_ready()
    return server


def shard_pids(uds: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"tgi_server serve .* --uds-path {uds}"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_killed_shard_stops_everything_with_an_error_naming_it(tiny_llama, hf_home, tmp_path):
    uds = str(tmp_path / "sock")
    server = start(tiny_llama, hf_home, uds, num_shard=2)
    try:
        victim = shard_pids(uds)[1]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = server.process.wait(timeout=15)
        elapsed = time.monotonic() - killed_at
    finally:
        server.stop()
    assert code != 0
    assert elapsed < 5
    assert "terminated with exit code" in server.log and "Shard" in server.log
    assert glob.glob(uds + "-*") == []
    assert shard_pids(uds) == []


def test_sigterm_shuts_down_cleanly_with_exit_code_zero(tiny_llama, hf_home, tmp_path):
    uds = str(tmp_path / "sock")
    server = start(tiny_llama, hf_home, uds)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert glob.glob(uds + "-*") == []
    assert shard_pids(uds) == []


def test_two_launchers_side_by_side_do_not_collide(tiny_llama, hf_home):
    first = Server(str(tiny_llama), hf_home, "--max-batch-total-tokens", "4096")
    second = Server(str(tiny_llama), hf_home, "--max-batch-total-tokens", "4096")
    try:
        first.wait_ready()
        second.wait_ready()
    finally:
        first.stop()
        second.stop()
    assert first.process.returncode == 0 and second.process.returncode == 0
