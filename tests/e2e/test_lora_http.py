"""LoRA adapters through HTTP (`--lora-adapters`): tiny PEFT adapters built here with peft on a tiny
Llama, served beside the base model with one shard and two. Each request's greedy tokens equal peft's
merged model of its adapter (or the base model's), all requests in flight at once and twice over (the
second time from cached prefixes, which are cached per adapter); OpenAI's `model` names an adapter;
/v1/models lists them; an adapter not loaded gets 422 naming the loaded ones. At run time (vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter, behind the API key): more adapters than GPU slots
take turns in them with the same tokens, an adapter that does not fit is refused while the server
keeps serving, and unloading waits for the requests using the adapter."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from server_helpers import MAX_NEW_TOKENS, PROMPTS, running_server, save_tiny_model, tiny_config, token_ids, transformers_greedy

ADAPTERS = {  # name: (rank, alpha, target modules)
    "support": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "sql": (8, 16, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_tokenizer_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base_dir = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, root / "base")
    for seed, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items(), 1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                               LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # large enough to change greedy tokens
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.normal_(0.0, 0.2)
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def expected(checkpoints):
    """peft's merged model of each adapter (and the base model, None): greedy tokens of PROMPTS."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = {}
    for name in [None, *ADAPTERS]:
        model = AutoModelForCausalLM.from_pretrained(checkpoints / "base", dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, checkpoints / name).merge_and_unload()
        out[name] = transformers_greedy(model.eval(), checkpoints / "base", PROMPTS, MAX_NEW_TOKENS)
    return out


async def _generate(session, url, prompt, adapter_id, max_new_tokens=MAX_NEW_TOKENS, **extra):
    parameters = {"max_new_tokens": max_new_tokens, "details": True, **extra,
                  **({"adapter_id": adapter_id} if adapter_id else {})}
    async with session.post(url + "/generate", json={"inputs": prompt, "parameters": parameters}) as response:
        assert response.status == 200, await response.text()
        return token_ids((await response.json())["details"])


@pytest.mark.parametrize("num_shard, layout", [(1, ()), (2, ()), (2, ("--pipeline-parallel-size", "2"))],
                         ids=["1 shard", "2 shards", "2 pipeline stages"])
async def test_each_request_gets_its_adapters_tokens_in_a_mixed_batch(checkpoints, expected, hf_home, num_shard, layout):
    """(Two pipeline stages: each stage takes the adapters' weights of its own layers.)"""
    adapters = ",".join(f"{name}={checkpoints / name}" for name in ADAPTERS)
    with running_server(str(checkpoints / "base"), hf_home, "--lora-adapters", adapters, *layout,
                        num_shard=num_shard) as server:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # the second round from cached prefixes, each adapter's own
                names = [None, *ADAPTERS]
                got = await asyncio.gather(*(_generate(session, server.url, prompt, name) for name in names for prompt in PROMPTS))
                for i, name in enumerate(names):
                    assert got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] == expected[name], name
            assert expected["support"] != expected[None] != expected["sql"]  # the adapters matter
            body = {"model": "sql", "prompt": PROMPTS[1], "max_tokens": MAX_NEW_TOKENS, "temperature": 0, "logprobs": 0}
            async with session.post(server.url + "/v1/completions", json=body) as response:
                completion = await response.json()
            async with session.get(server.url + "/v1/models") as response:
                models = await response.json()
            async with session.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "chat"}}) as response:
                status, error = response.status, await response.json()
            async with session.get(server.url + "/info") as response:
                info = await response.json()
    assert completion["model"] == "sql" and len(completion["choices"][0]["logprobs"]["tokens"]) == MAX_NEW_TOKENS
    sql_text = completion["choices"][0]["text"]
    assert sql_text == _decode(checkpoints / "base", expected["sql"][1])
    assert [m["id"] for m in models["data"]][1:] == ["support", "sql"]
    assert status == 422 and error == {"error": "Input validation error: adapter `chat` is not loaded (loaded: `support`, `sql`)",
                                       "error_type": "validation"}
    assert info["lora_adapters"] == ["support", "sql"]


def _decode(tokenizer_dir, ids):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).decode(ids, skip_special_tokens=True)


async def test_an_adapter_that_does_not_fit_the_model_stops_the_launcher_naming_it(checkpoints, hf_home, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"target_modules \['lm_head'\] are not supported"):
        with running_server(str(checkpoints / "base"), hf_home, "--lora-adapters", f"bad={tmp_path}"):
            pass


async def _post(session, url, route, body):
    async with session.post(url + route, json=body) as response:
        return response.status, await response.text()


@pytest.mark.parametrize("num_shard, num_replicas", [(1, 1), (2, 1), (1, 2)])
async def test_adapters_loaded_at_run_time_take_turns_in_fewer_slots_and_unload_after_their_requests(
    checkpoints, expected, hf_home, tmp_path, num_shard, num_replicas
):
    """Also with two data-parallel replicas: each loads and unloads every adapter, with slots of its own."""
    args = ("--lora-adapters", f"support={checkpoints / 'support'}", "--max-loras", "1", "--api-key", "k",
            "--data-parallel-size", str(num_replicas))
    _save_wide_adapter(checkpoints / "base", tmp_path, rank=32)
    with running_server(str(checkpoints / "base"), hf_home, *args, num_shard=num_shard) as server:
        url = server.url
        async with aiohttp.ClientSession() as anonymous:
            refused = await _post(anonymous, url, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(checkpoints / "sql")})
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as session:
            loaded = await _post(session, url, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(checkpoints / "sql")})
            again = await _post(session, url, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(checkpoints / "sql")})
            too_wide = await _post(session, url, "/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": str(tmp_path)})
            # one slot, two adapters and the base model, all at once: the adapters take turns in the slot
            names = [None, "support", "sql"]
            got = await asyncio.gather(*(_generate(session, url, prompt, name) for name in names for prompt in PROMPTS))
            for i, name in enumerate(names):
                assert got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] == expected[name], name
            async with session.get(url + "/v1/models") as response:
                models = [m["id"] for m in (await response.json())["data"]][1:]
            # unloading waits for the request using the adapter, which finishes with its tokens
            long = asyncio.ensure_future(_generate(session, url, PROMPTS[0], "sql", 300, ignore_eos=True))
            await asyncio.sleep(0.5)
            unloaded = await _post(session, url, "/v1/unload_lora_adapter", {"lora_name": "sql"})
            long_done_first = long.done()
            long_tokens = await long
            after = await _post(session, url, "/generate", {"inputs": "hi", "parameters": {"adapter_id": "sql"}})
            missing = await _post(session, url, "/v1/unload_lora_adapter", {"lora_name": "sql"})
            # the same adapter under a new name: a new adapter, its own cached blocks, the same tokens
            reloaded = await _post(session, url, "/v1/load_lora_adapter", {"lora_name": "sql-2", "lora_path": str(checkpoints / "sql")})
            sql_again = await asyncio.gather(*(_generate(session, url, prompt, "sql-2") for prompt in PROMPTS))
            async with session.get(url + "/info") as response:
                info = await response.json()
    assert refused[0] == 401
    assert loaded == (200, "Success: LoRA adapter 'sql' (rank 8) added successfully.")
    assert again[0] == 400 and "`sql` has already been loaded" in again[1]
    assert too_wide[0] == 400 and "rank 32 is above the server's maximum 16 (--max-lora-rank)" in too_wide[1]
    assert models == ["support", "sql"]
    assert unloaded == (200, "Success: LoRA adapter 'sql' removed successfully.") and long_done_first
    assert len(long_tokens) == 300 and long_tokens[:MAX_NEW_TOKENS] == expected["sql"][0]
    assert after[0] == 422 and "adapter `sql` is not loaded (loaded: `support`)" in after[1]
    assert missing[0] == 404
    assert reloaded[0] == 200 and sql_again == expected["sql"]
    assert info["lora_adapters"] == ["support", "sql-2"] and info["max_loras"] == 1


def _save_wide_adapter(base_dir, out, rank):
    """A PEFT adapter of `rank` on the first layer's q_proj, written by hand (peft would do the same)."""
    import json

    import torch
    from safetensors.torch import save_file

    hidden = json.loads((base_dir / "config.json").read_text())["hidden_size"]
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": torch.zeros(rank, hidden), f"{module}.lora_B.weight": torch.zeros(hidden, rank)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"]}))
