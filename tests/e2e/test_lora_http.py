"""LoRA adapters through HTTP (`--lora-adapters`): tiny PEFT adapters built here with peft on a tiny
Llama, served beside the base model with one shard and two. Each request's greedy tokens equal peft's
merged model of its adapter (or the base model's), all requests in flight at once and twice over (the
second time from cached prefixes, which are cached per adapter); OpenAI's `model` names an adapter;
/v1/models lists them; an adapter not loaded gets 422 naming the loaded ones."""

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


async def _generate(session, url, prompt, adapter_id):
    parameters = {"max_new_tokens": MAX_NEW_TOKENS, "details": True, **({"adapter_id": adapter_id} if adapter_id else {})}
    async with session.post(url + "/generate", json={"inputs": prompt, "parameters": parameters}) as response:
        assert response.status == 200, await response.text()
        return token_ids((await response.json())["details"])


@pytest.mark.parametrize("num_shard", [1, 2])
async def test_each_request_gets_its_adapters_tokens_in_a_mixed_batch(checkpoints, expected, hf_home, num_shard):
    adapters = ",".join(f"{name}={checkpoints / name}" for name in ADAPTERS)
    with running_server(str(checkpoints / "base"), hf_home, "--lora-adapters", adapters, num_shard=num_shard) as server:
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
