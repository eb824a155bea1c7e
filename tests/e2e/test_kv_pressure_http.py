"""A real server with a KV cache far too small for its load (tiny random Llama, 16 blocks of 16
tokens): preempted requests still give their greedy output, and a client that goes away frees its
blocks at once."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import running_server, save_tiny_model, tiny_config

NUM_NEW_TOKENS = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_home, smollm2_tokenizer_dir):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("kv") / "llama")
    args = ("--max-batch-total-tokens", "256", "--max-total-tokens", "128")
    with running_server(str(model), hf_home, *args) as server:
        yield server


async def generate(session, server, prompt: str) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NUM_NEW_TOKENS, "ignore_eos": True, "details": True}}
    async with session.post(server.url + "/generate", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def metrics(session, server) -> dict[str, float]:
    async with session.get(server.url + "/metrics") as response:
        text = await response.text()
    return {(s.name + str(sorted(s.labels.items()) if s.labels else "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_requests_beyond_the_kv_cache_are_preempted_and_each_matches_its_greedy_output_alone(server):
    # 12 sequences of ~110 tokens need ~84 blocks; the cache has 16, so most are preempted and recomputed.
    prompts = [f"Request number {i} asks for a story about {topic}" for i, topic in
               enumerate(["cats", "dogs", "ships", "rain", "trains", "maps"] * 2)]
    async with aiohttp.ClientSession() as session:
        alone = [await generate(session, server, prompt) for prompt in prompts]
        before = await metrics(session, server)
        together = await asyncio.gather(*(generate(session, server, prompt) for prompt in prompts))
        after = await metrics(session, server)
    assert after["tgi_request_preemption_total"] - before.get("tgi_request_preemption_total", 0) >= 4
    assert [r["generated_text"] for r in together] == [r["generated_text"] for r in alone]
    assert [[t["id"] for t in r["details"]["tokens"]] for r in together] == \
           [[t["id"] for t in r["details"]["tokens"]] for r in alone]
    assert all(r["details"]["generated_tokens"] == NUM_NEW_TOKENS for r in together)
    assert after["tgi_batch_current_max_tokens"] == 0  # every block is free again


async def test_client_leaving_mid_stream_frees_its_kv_blocks_at_once(server):
    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": NUM_NEW_TOKENS, "ignore_eos": True}}
    async with aiohttp.ClientSession() as session:
        before = await metrics(session, server)
        async with session.post(server.url + "/generate_stream", json=body) as stream:
            for _ in range(3):
                await stream.content.readline()
            during = await metrics(session, server)
            stream.close()
        assert during["tgi_batch_current_max_tokens"] > 0
        for _ in range(100):
            after = await metrics(session, server)
            if after["tgi_batch_current_max_tokens"] == 0:
                break
            await asyncio.sleep(0.01)
    dropped = "tgi_request_failure_total[('err', 'dropped')]"
    assert after["tgi_batch_current_max_tokens"] == 0 and after["tgi_batch_current_size"] == 0
    assert after[dropped] == before.get(dropped, 0) + 1
    # The request stopped soon after the client left, well before its 100 tokens. (Counted from the
    # snapshot taken just before the close: how many steps run while the client reads its first lines
    # and that snapshot is on its way depends on the machine's load, not on the server.)
    steps = {name: sum(v for k, v in m.items() if k.startswith("tgi_batch_inference_count_total"))
             for name, m in (("before", before), ("during", during), ("after", after))}
    assert steps["after"] - steps["before"] < NUM_NEW_TOKENS
    assert steps["after"] - steps["during"] < NUM_NEW_TOKENS / 4


async def test_prompts_are_not_written_to_the_logs(server):
    prompt = "zebra-quokka-7731 is a secret prompt"
    async with aiohttp.ClientSession() as session:
        await generate(session, server, prompt)
        async with session.post(server.url + "/generate", json={"inputs": prompt, "parameters": {"top_p": 2}}):
            pass
    assert "zebra-quokka-7731" not in server.log
