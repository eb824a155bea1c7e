"""Two launchers on this machine as node 0 and node 1 of one deployment (`--nnodes 2`, two gloo shards
each, four ranks of tensor parallel, each KV head on two of them): greedy output equals transformers'; a launcher or a router without
the shard secret is refused; a node that dies takes the other down within 10 s, naming it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_helpers import (
    MAX_NEW_TOKENS, PREFIX_PROMPTS, PROMPTS, Server, assert_greedy_equals_transformers_with_cached_prefixes,
    free_port_pair, save_tiny_model, tiny_config, transformers_greedy,
)

SECRET = "correct horse battery staple"
LIMITS = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")


def node(model: Path, hf_home: Path, rank: int, master_port: int, secret: str = SECRET) -> Server:
    return Server(str(model), hf_home, *LIMITS, "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                  "--master-port", str(master_port), num_shard=4,
                  env={"SHARD_SECRET": secret, "CUDA_VISIBLE_DEVICES": ""})


def wait_exit(server: Server, timeout: float) -> int:
    try:
        return server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher still running after {timeout} s:\n{server.log[-3000:]}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    # Two KV heads over four ranks: each is copied on two ranks, which split its two query heads.
    config = tiny_config("llama")
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    return save_tiny_model(config, smollm2_tokenizer_dir, tmp_path_factory.mktemp("multi-node") / "llama")


@pytest.fixture(scope="module")
def deployment(tiny_model, hf_home):
    master_port = free_port_pair()
    node0 = node(tiny_model, hf_home, 0, master_port)
    stranger = node(tiny_model, hf_home, 1, master_port, secret="wrong")
    node1 = None
    try:
        assert wait_exit(stranger, 60) == 1
        assert "Node 1 cannot join the deployment: refused by node 0: wrong shard secret" in stranger.log
        node1 = node(tiny_model, hf_home, 1, master_port)
        node0.wait_ready(timeout=300)
        yield node0, node1
    finally:
        for server in (node1, node0, stranger):
            if server is not None:
                server.stop()


async def test_two_nodes_of_two_shards_generate_what_transformers_does(deployment, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    node0, node1 = deployment
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = transformers_greedy(model, tiny_model, PROMPTS + PREFIX_PROMPTS, MAX_NEW_TOKENS)
    await assert_greedy_equals_transformers_with_cached_prefixes(node0.url, tiny_model, expected)
    assert "Starting 2 shard(s) (ranks 2 to 3 of 4)" in node1.log and "Node 1 joined from 127.0.0.1" in node0.log


def test_a_router_without_the_shard_secret_is_refused(deployment, tiny_model):
    node0, _ = deployment
    remote = re.search(r"Node 1's shards serve on (\S+), (\S+)", node0.log).groups()
    uds = uds_of(node0.process.pid)
    addresses = ",".join([f"unix:{uds}-0", f"unix:{uds}-1", *remote])
    env = {**os.environ, "SHARD_SECRET": "guess"}
    result = subprocess.run([sys.executable, "-m", "tgi_router", "--tokenizer-path", str(tiny_model), "--num-shard", "4",
                             "--shard-addresses", addresses, "--port", "0"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot start: Info failed on shard" in result.stderr and "wrong or missing shard secret" in result.stderr


def test_a_dead_node_stops_the_other_within_10_s_naming_it(deployment):
    node0, node1 = deployment
    node1.process.send_signal(signal.SIGKILL)
    started = time.monotonic()
    assert wait_exit(node0, 10) != 0
    assert time.monotonic() - started < 10
    assert "Node 1 went away" in node0.log, node0.log[-2000:]
    deadline = time.monotonic() + 10  # node 1's shards die with their launcher (PDEATHSIG)
    while _shards_of(node1.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _shards_of(node1.process.pid)


def _shards_of(launcher_pid: int) -> list[int]:
    """The shard processes a launcher started, alive or orphaned: by its default --shard-uds-path."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_text()
        except OSError:
            continue
        if "tgi_server\0serve" in cmdline and f"{uds_of(launcher_pid)}\0" in cmdline:
            found.append(int(entry))
    return found


def uds_of(launcher_pid: int) -> str:
    return f"/tmp/text-generation-server-{launcher_pid}"
