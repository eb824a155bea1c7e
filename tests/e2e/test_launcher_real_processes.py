"""The launcher supervises real shards and a real router (tiny random Llama on CPU)."""

from __future__ import annotations

import asyncio
import glob
import json
import signal
import subprocess
import time

import aiohttp
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
    out = subprocess.run(["pgrep", "-f", f"tgi_server serve .* --shard-uds-path {uds}"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


LONG = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 600, "ignore_eos": True}}


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


async def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero(tiny_llama, hf_home, tmp_path):
    uds = str(tmp_path / "sock")
    server = start(tiny_llama, hf_home, uds)
    refusals = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(server.url + "/generate_stream", json=LONG) as stream:
                text = (await stream.content.readline()).decode()
                server.process.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                # One token each: a request that slips in before the signal is handled answers at once.
                while not refusals and time.monotonic() - stopped_at < 5:
                    quick = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
                    async with session.post(server.url + "/generate", json=quick) as response:
                        if response.status == 503:
                            refusals.append(await response.json())
                text += (await stream.content.read()).decode()
                drained_at = time.monotonic()
        code = await asyncio.to_thread(server.process.wait, 30)
        exited_after_drain = time.monotonic() - drained_at
    finally:
        server.stop()
    assert refusals == [{"error": "Server is shutting down", "error_type": "shutting_down"}]
    events = sse_events(text)
    assert len(events) == 600 and events[-1]["generated_text"] is not None  # the in-flight request finished
    assert code == 0
    # How long the 600 tokens take depends on the machine; once they are sent, the processes stop promptly.
    assert exited_after_drain < 10
    assert "did not stop" not in server.log  # nothing needed SIGKILL
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


def broken_copy(tiny_llama, tmp_path, **config_changes) -> str:
    """A copy of the tiny model with `config_changes` in its config.json (None deletes a file)."""
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(tiny_llama, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in config_changes.items():
        if key.endswith("_file") and value is None:
            (out / key.removesuffix("_file").replace("__", ".")).unlink()
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 1000}, "tensor 'model.embed_tokens.weight' has shape [49152, 64], but the model's config implies [1000, 64]"),
        ({"vocab_size": 50000}, "tensor 'model.embed_tokens.weight' has shape [49152, 64], but the model's config implies [50000, 64]"),
        ({"intermediate_size": 96}, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], but the model's config implies [96, 64]"),
        ({"tokenizer__json_file": None}, "has no tokenizer.json"),
        ({"architectures": ["FancyNewForCausalLM"]}, "unsupported architecture 'FancyNewForCausalLM'"),
    ],
    ids=["vocab-smaller", "vocab-larger", "mlp-size", "no-tokenizer", "architecture"],
)
def test_a_checkpoint_that_disagrees_with_its_config_stops_the_launcher_naming_the_tensor_or_file(
    tiny_llama, hf_home, tmp_path, changes, message
):
    server = Server(broken_copy(tiny_llama, tmp_path, **changes), hf_home, "--max-batch-total-tokens", "4096")
    try:
        code = server.process.wait(timeout=120)
    finally:
        server.stop()
    assert code != 0
    assert message in server.log
    error_lines = [line for line in server.log.splitlines() if message in line]
    assert any("failed to start" in line or "Could not prepare" in line for line in error_lines), server.log[-3000:]
    assert "Traceback" not in server.log
