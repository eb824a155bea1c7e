"""Generation parameters that only show in what the shard computes, checked through HTTP on a tiny
random Llama (fp32, CPU) against independent oracles: HF transformers `generate()` for the penalties,
TGI's green list for the watermark, the greedy text itself for stop sequences and top-n tokens."""

from __future__ import annotations

import aiohttp
import pytest
import torch
from server_helpers import running_server, save_tiny_model, tiny_config

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Once upon a time"]
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_tokenizer_dir):
    return save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("params") / "llama")


@pytest.fixture(scope="module")
def server(tiny_model, hf_home):
    with running_server(str(tiny_model), hf_home, "--max-batch-total-tokens", "8192", "--max-batch-prefill-tokens", "512",
                        "--max-total-tokens", "1024") as server:
        yield server


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


async def generate(server, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NUM_NEW_TOKENS, "details": True, **parameters}}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/generate", json=body) as response:
            payload = await response.json()
            assert response.status == 200, payload
            return payload


def token_ids(payload: dict) -> list[int]:
    return [token["id"] for token in payload["details"]["tokens"]]


class FrequencyPenalty:
    """TGI's frequency penalty as documented: each logit minus penalty x (the token's share of the
    sequence so far, prompt included)."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.penalty * counts / input_ids.shape[1]


def hf_greedy(hf_model, tokenizer, prompt: str, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
              sequence_bias: dict | None = None) -> list[int]:
    from transformers import LogitsProcessorList

    input_ids = torch.tensor([tokenizer.encode(prompt).ids])
    processors = LogitsProcessorList([FrequencyPenalty(frequency_penalty)] if frequency_penalty else [])
    with torch.no_grad():
        out = hf_model.generate(input_ids, max_new_tokens=NUM_NEW_TOKENS, do_sample=False, min_new_tokens=NUM_NEW_TOKENS,
                                repetition_penalty=repetition_penalty, logits_processor=processors,
                                sequence_bias=sequence_bias)
    return out[0, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.8}, {"frequency_penalty": 1.5},
                                       {"repetition_penalty": 1.3, "frequency_penalty": 0.8}])
async def test_greedy_with_penalties_equals_transformers_with_the_same_penalties(server, hf_model, tokenizer, penalties):
    num_changed = 0
    for prompt in PROMPTS:
        expected = hf_greedy(hf_model, tokenizer, prompt, **penalties)
        num_changed += expected != hf_greedy(hf_model, tokenizer, prompt)
        ours = token_ids(await generate(server, prompt, ignore_eos=True, **penalties))
        assert ours == expected, prompt
    assert num_changed >= 2  # the penalties change the text: dropping them would fail this test


async def test_greedy_with_a_logit_bias_equals_transformers_with_the_same_sequence_bias(server, hf_model, tokenizer):
    for prompt in PROMPTS[:2]:
        plain = hf_greedy(hf_model, tokenizer, prompt)
        bias = {plain[0]: -100.0, plain[3]: -4.0, 100: 3.0}  # the first greedy token banned
        expected = hf_greedy(hf_model, tokenizer, prompt, sequence_bias={(token,): value for token, value in bias.items()})
        assert expected != plain
        json_bias = {str(token): value for token, value in bias.items()}  # JSON keys are strings
        assert token_ids(await generate(server, prompt, ignore_eos=True, logit_bias=json_bias)) == expected
        body = {"prompt": prompt, "max_tokens": NUM_NEW_TOKENS, "temperature": 0, "ignore_eos": True, "logit_bias": json_bias}
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/completions", json=body) as response:
                text = (await response.json())["choices"][0]["text"]
        assert text == tokenizer.decode(expected)


async def test_sampling_with_min_p_picks_only_tokens_within_min_p_of_the_best(server, hf_model, tokenizer):
    """Each sampled token's probability (transformers' logits at the same temperature, teacher-forced)
    is at least min_p times the best one's; without min_p the same seeds pick tokens far below it."""
    prompt, temperature, min_p = PROMPTS[0], 1.0, 0.9
    prompt_ids = tokenizer.encode(prompt).ids

    def worst_ratio(tokens: list[int]) -> float:
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
        probs = torch.softmax(logits / temperature, dim=-1)
        chosen = probs.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        return (chosen / probs.max(dim=-1).values).min().item()

    for seed in range(3):
        parameters = dict(ignore_eos=True, do_sample=True, temperature=temperature, seed=seed)
        assert worst_ratio(token_ids(await generate(server, prompt, **parameters, min_p=min_p))) >= min_p - 1e-4
        assert worst_ratio(token_ids(await generate(server, prompt, **parameters))) < min_p


async def test_a_stop_sequence_ending_inside_a_token_cuts_the_text_there(server):
    plain = await generate(server, PROMPTS[0], ignore_eos=True)
    tokens = plain["details"]["tokens"]
    # A stop sequence that ends one character into a token of two or more characters, some tokens in.
    index = next(i for i, t in enumerate(tokens) if i >= 3 and len(t["text"]) >= 2)
    text_before = "".join(t["text"] for t in tokens[:index])
    stop = text_before[-3:] + tokens[index]["text"][0]
    assert plain["generated_text"].startswith(text_before + tokens[index]["text"])
    cut = await generate(server, PROMPTS[0], ignore_eos=True, stop=[stop])
    assert cut["generated_text"] == text_before + tokens[index]["text"][0]
    assert cut["details"]["finish_reason"] == "stop_sequence"
    assert cut["details"]["generated_tokens"] == index + 1


async def test_return_full_text_puts_the_prompt_before_the_generated_text(server):
    plain = await generate(server, PROMPTS[1])
    full = await generate(server, PROMPTS[1], return_full_text=True)
    assert full["generated_text"] == PROMPTS[1] + plain["generated_text"]
    assert not plain["generated_text"].startswith(PROMPTS[1])


async def test_every_top_n_list_holds_n_sorted_alternatives_with_the_greedy_choice_first(server):
    payload = await generate(server, PROMPTS[2], top_n_tokens=3)
    top_tokens = payload["details"]["top_tokens"]
    assert len(top_tokens) == NUM_NEW_TOKENS
    for chosen, alternatives in zip(payload["details"]["tokens"], top_tokens):
        logprobs = [t["logprob"] for t in alternatives]
        assert len(alternatives) == 3 and logprobs == sorted(logprobs, reverse=True)
        assert alternatives[0]["id"] == chosen["id"] and alternatives[0]["logprob"] == pytest.approx(chosen["logprob"])
        assert len({t["id"] for t in alternatives}) == 3


def green_share(prompt_ids: list[int], generated: list[int], vocab_size: int, gamma: float = 0.5) -> float:
    """Share of `generated` in TGI's green list (Kirchenbauer et al.: a randperm of the vocabulary
    seeded with 15485863 x the previous token; its first gamma x vocab tokens are green)."""
    previous = [*prompt_ids[-1:], *generated[:-1]]
    num_green = 0
    for before, token in zip(previous, generated):
        generator = torch.Generator().manual_seed(15485863 * before)
        num_green += token in set(torch.randperm(vocab_size, generator=generator)[: int(gamma * vocab_size)].tolist())
    return num_green / len(generated)


async def test_watermarked_greedy_text_differs_and_leans_to_the_green_list(server, tokenizer, tiny_model):
    vocab_size = tiny_config("llama").vocab_size
    prompt_ids = tokenizer.encode(PROMPTS[3]).ids
    plain = token_ids(await generate(server, PROMPTS[3], ignore_eos=True))
    marked = token_ids(await generate(server, PROMPTS[3], ignore_eos=True, watermark=True))
    assert marked != plain
    assert green_share(prompt_ids, marked, vocab_size) >= 0.9
    assert green_share(prompt_ids, plain, vocab_size) < 0.8


async def test_info_reports_the_model_and_kv_cache_dtypes(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/info") as response:
            info = await response.json()
    assert (info["model_dtype"], info["kv_cache_dtype"], info["model_device_type"]) == ("float32", "float32", "cpu")
    assert info["max_batch_total_tokens"] >= 8192 and info["num_shard"] == 1


async def test_an_fp8_kv_cache_shows_in_info_and_changes_the_logprobs(server, tiny_model, hf_home):
    plain = await generate(server, PROMPTS[0], decoder_input_details=True)
    with running_server(str(tiny_model), hf_home, "--kv-cache-dtype", "fp8_e5m2", "--max-batch-total-tokens", "8192",
                        "--max-batch-prefill-tokens", "512", "--max-total-tokens", "1024") as fp8_server:
        async with aiohttp.ClientSession() as session:
            async with session.get(fp8_server.url + "/info") as response:
                info = await response.json()
        fp8 = await generate(fp8_server, PROMPTS[0], decoder_input_details=True)
    assert info["kv_cache_dtype"] == "float8_e5m2"
    # Attention reads K/V rounded to 2 mantissa bits: the prompt's logprobs move, a little.
    ours = [t["logprob"] for t in fp8["details"]["prefill"][1:]]
    theirs = [t["logprob"] for t in plain["details"]["prefill"][1:]]
    differences = [abs(a - b) for a, b in zip(ours, theirs)]
    assert 0 < max(differences) < 0.5


async def test_a_temperature_too_small_for_float32_samples_greedily_on_every_route(server):
    greedy = (await generate(server, PROMPTS[0], ignore_eos=True))["generated_text"]
    tiny = (await generate(server, PROMPTS[0], ignore_eos=True, do_sample=True, temperature=1e-40, seed=3))["generated_text"]
    body = {"model": "tgi", "prompt": PROMPTS[0], "max_tokens": NUM_NEW_TOKENS, "temperature": 1e-40, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions", json=body) as response:
            completion = await response.json()
            assert response.status == 200, completion
    assert tiny == greedy
    assert completion["choices"][0]["text"] == greedy
