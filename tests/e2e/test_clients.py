"""Unmodified clients against the server: HF's `text-generation`, `huggingface_hub.InferenceClient`
and `openai` (tiny random Llama with SmolLM2's tokenizer and chat template)."""

from __future__ import annotations

import pytest
from server_helpers import running_server, save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_home, smollm2_tokenizer_dir):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("cli") / "llama")
    with running_server(str(model), hf_home, "--max-batch-total-tokens", "8192") as server:
        yield server


def test_text_generation_client_generates_with_details_and_streams(server):
    from text_generation import Client

    client = Client(server.url)
    response = client.generate("Hello", max_new_tokens=5, top_n_tokens=2)
    assert response.details.generated_tokens == 5
    assert response.details.finish_reason == "length"
    assert len(response.details.top_tokens) == 5
    for chosen, alternatives in zip(response.details.tokens, response.details.top_tokens):
        assert len(alternatives) == 2 and alternatives[0].logprob >= alternatives[1].logprob
        assert chosen.id == alternatives[0].id  # greedy: the chosen token is the most likely
    events = list(client.generate_stream("Hello", max_new_tokens=4))
    assert len(events) == 4 and events[-1].details.generated_tokens == 4
    assert events[-1].generated_text == "".join(e.token.text for e in events)


async def test_text_generation_async_client(server):
    from text_generation import AsyncClient

    client = AsyncClient(server.url)
    response = await client.generate("Hello", max_new_tokens=3, do_sample=True, seed=7)
    assert response.details.seed == 7
    tokens = [event.token.id async for event in client.generate_stream("Hello", max_new_tokens=3)]
    assert len(tokens) == 3


def test_huggingface_hub_inference_client(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    text = client.text_generation("Hello", max_new_tokens=4)
    assert isinstance(text, str) and text
    chunks = list(client.text_generation("Hello", max_new_tokens=3, stream=True))
    assert len(chunks) == 3
    chat = client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.content
    streamed = list(client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed)


def test_openai_client_chat_completions_models(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 3
    completion = client.completions.create(model="tgi", prompt="Hello", max_tokens=3)
    assert completion.choices[0].text
    assert [m.id for m in client.models.list()] == [str(server.model_id)]
