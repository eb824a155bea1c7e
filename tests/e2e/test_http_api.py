"""The HTTP surface on a tiny random Llama: headers, tokenization routes, cloud routes, errors."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from server_helpers import Server, free_port, running_server, save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_home, smollm2_tokenizer_dir):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("api") / "llama")
    args = ("--max-batch-total-tokens", "8192", "--max-concurrent-requests", "2", "--max-total-tokens", "512")
    with running_server(str(model), hf_home, *args) as server:
        yield server


async def call(server, method, path, **kwargs):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path, **kwargs) as response:
            is_json = response.content_type == "application/json"
            return response.status, response.headers, (await response.json() if is_json else await response.text())


async def test_generate_sends_tgi_timing_and_token_headers(server):
    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 5}}
    status, headers, _ = await call(server, "POST", "/generate", json=body)
    assert status == 200
    assert headers["x-compute-type"] == "cpu"
    assert headers["x-generated-tokens"] == "5"
    assert headers["x-compute-characters"] == str(len("Hello there"))
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert int(headers[name]) >= 0
    assert float(headers["x-compute-time"]) > 0


async def test_tokenize_returns_ids_with_text_and_byte_offsets(server):
    status, _, tokens = await call(server, "POST", "/tokenize", json={"inputs": "Héllo world"})
    assert status == 200
    assert "".join(t["text"] for t in tokens) == "Héllo world"
    assert tokens[-1]["stop"] == len("Héllo world".encode())


async def test_chat_tokenize_returns_the_templated_text_and_its_tokens(server):
    body = {"messages": [{"role": "user", "content": "Hi!"}]}
    status, _, payload = await call(server, "POST", "/chat_tokenize", json=body)
    assert status == 200
    assert payload["templated_text"].endswith("<|im_start|>assistant\n")
    assert "".join(t["text"] for t in payload["tokenize_response"]) == payload["templated_text"]


async def test_ping_and_health_answer_200(server):
    assert (await call(server, "GET", "/ping"))[0] == 200
    assert (await call(server, "GET", "/health"))[0] == 200


async def test_invocations_accepts_generate_chat_and_completion_shapes(server):
    generate = await call(server, "POST", "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    chat = await call(server, "POST", "/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    completion = await call(server, "POST", "/invocations", json={"prompt": "Hi", "max_tokens": 2})
    assert generate[0] == chat[0] == completion[0] == 200
    assert isinstance(generate[2], list)
    assert chat[2]["object"] == "chat.completion"
    assert completion[2]["object"] == "text_completion"


async def test_vertex_returns_one_prediction_per_instance(server):
    body = {"instances": [{"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, {"inputs": "Yo"}]}
    status, _, payload = await call(server, "POST", "/vertex", json=body)
    assert status == 200
    assert len(payload["predictions"]) == 2


async def test_vertex_samples_each_instance_with_its_seed_and_takes_chat_instances(server):
    """As TGI's handler: generate instances sample (the seed picks the text), chat instances work."""
    instances = [{"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12, "seed": seed}} for seed in range(4)]
    instances.append({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    status, _, payload = await call(server, "POST", "/vertex", json={"instances": instances})
    again = await call(server, "POST", "/vertex", json={"instances": instances[:1]})
    assert status == 200 and len(payload["predictions"]) == 5
    assert len(set(payload["predictions"][:4])) > 1  # seeds differ: texts differ
    assert again[2]["predictions"][0] == payload["predictions"][0]  # the same seed: the same text
    assert isinstance(payload["predictions"][4], str) and payload["predictions"][4]


@pytest.mark.parametrize("count", [0, 3])
async def test_completions_integer_logprobs_report_each_token_and_that_many_alternatives(server, count):
    body = {"model": "tgi", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "logprobs": count, "ignore_eos": True}
    status, _, payload = await call(server, "POST", "/v1/completions", json=body)
    assert status == 200, payload
    choice = payload["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == 6
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(logprobs["tokens"][0])
    for token, logprob, alternatives in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(alternatives) == count and logprob <= 0
        if count:
            assert max(alternatives.values()) == pytest.approx(logprob)  # greedy: the chosen token is the best
    stream_body = {**body, "stream": True}
    _, _, text = await call(server, "POST", "/v1/completions", json=stream_body)
    chunks = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    streamed = [c["choices"][0]["logprobs"] for c in chunks]
    assert [s["tokens"][0] for s in streamed] == logprobs["tokens"]
    assert [s["text_offset"][0] for s in streamed] == logprobs["text_offset"]


async def test_completions_logprobs_of_the_wrong_type_are_a_422(server):
    for value in (True, -1, "2"):
        body = {"prompt": "Hello", "max_tokens": 2, "logprobs": value}
        status, _, payload = await call(server, "POST", "/v1/completions", json=body)
        assert status == 422 and "`logprobs` must be a non-negative integer" in payload["error"], payload


JSON = {"Content-Type": "application/json"}
MALFORMED_BODIES = [
    ({"data": "{not json", "headers": JSON}, 400),
    ({"data": b"", "headers": JSON}, 400),
    ({"data": b'{"inputs": "\xff\xfe"}', "headers": JSON}, 400),  # not UTF-8
    ({"data": '{"inputs": "\\ud800"}', "headers": JSON}, 400),  # a lone surrogate escape
    ({"data": '{"inputs": "hi", "parameters": {"temperature": NaN}}', "headers": JSON}, 400),
    ({"data": '{"inputs": "hi", "parameters": {"seed": 1' + "0" * 5000 + "}}", "headers": JSON}, 400),
    ({"data": "[" * 100_000 + "]" * 100_000, "headers": JSON}, 400),
    ({"data": "inputs=hi", "headers": {"Content-Type": "text/plain"}}, 415),
    ({"data": b'{"inputs": "hi"}'}, 415),  # no Content-Type
]
POST_ROUTES = ["/generate", "/generate_stream", "/", "/tokenize", "/v1/completions", "/v1/chat/completions",
               "/chat_tokenize", "/invocations", "/vertex"]


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("kwargs, status", MALFORMED_BODIES)
async def test_malformed_bodies_get_tgi_error_json_on_every_route(server, path, kwargs, status):
    got_status, _, payload = await call(server, "POST", path, **kwargs)
    assert got_status == status
    assert payload["error_type"] == "validation" and payload["error"]


@pytest.mark.parametrize("body", [
    {"inputs": "hi", "parameters": {"top_p": 1.0}},
    {"inputs": "hi", "parameters": {"max_new_tokens": "many"}},
    {"inputs": "hi", "parameters": {"max_new_tokens": 600}},
    {"inputs": "hi", "parameters": {"max_new_tokens": -1}},
    {"inputs": "hi", "parameters": {"max_new_tokens": 2**70}},
    {"inputs": "hi", "parameters": {"seed": 2**64}},
    {"inputs": "hi", "parameters": {"top_p": 1e308}},  # beyond f32, as TGI reads it
    {"inputs": "hi", "parameters": {"repetition_penalty": -0.5}},
    {"inputs": "hi", "parameters": {"stop": ["a"] * 100}},
    {"inputs": ""},
    {"inputs": ["hi"]},
    ["inputs"],
])
async def test_bad_requests_get_tgi_error_json_never_500(server, body):
    status, _, payload = await call(server, "POST", "/generate", json=body)
    assert status == 422
    assert payload["error_type"] == "validation" and payload["error"]


@pytest.mark.parametrize("body", [
    {"messages": "hi"},
    {"messages": []},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": "hi", "name": 5}]},
    {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    {"messages": [{"role": "user", "content": "hi"}], "model": 5},
    {"messages": [{"role": "user", "content": "hi"}], "stream_options": 5},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": False},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
])
async def test_chat_requests_of_the_wrong_shape_get_422(server, body):
    status, _, payload = await call(server, "POST", "/v1/chat/completions", json=body)
    assert status == 422 and payload["error_type"] == "validation"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("field, value, message", [
    ("n", 0, "`n` must be a positive integer"), ("n", 5, "must be <= 4, the server's --max-client-batch-size"),
    ("logit_bias", {"4": 101}, "`logit_bias` values must be numbers between -100 and 100"),
    ("logit_bias", {"99999999": 1}, "`logit_bias` keys must be token ids below"), ("min_p", 1.5, "`min_p` must be"),
])
async def test_openai_fields_not_served_or_out_of_range_get_422(server, route, field, value, message):
    body = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", field: value}
    status, _, payload = await call(server, "POST", route, json=body)
    assert status == 422 and message in payload["error"]


async def test_chat_n_choices_are_each_the_answer_of_one_request_with_the_seed_plus_its_index(server):
    body = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 1.0,
            "seed": 11}
    status, _, many = await call(server, "POST", "/v1/chat/completions", json={**body, "n": 3})
    assert status == 200 and [c["index"] for c in many["choices"]] == [0, 1, 2]
    singles = [(await call(server, "POST", "/v1/chat/completions", json={**body, "seed": 11 + i}))[2] for i in range(3)]
    assert [c["message"] for c in many["choices"]] == [s["choices"][0]["message"] for s in singles]
    assert len({c["message"]["content"] for c in many["choices"]}) > 1  # sampled apart
    usage = many["usage"]
    assert usage["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]  # the prompt counts once
    assert usage["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    _, _, text = await call(server, "POST", "/v1/chat/completions", json={**body, "n": 3, "stream": True})
    streamed = ["", "", ""]
    for line in text.splitlines():
        if line.startswith("data:") and line != "data: [DONE]":
            choice = json.loads(line[5:])["choices"][0]
            streamed[choice["index"]] += choice["delta"]["content"]
    assert streamed == [c["message"]["content"] for c in many["choices"]]


async def test_completions_n_choices_come_prompt_by_prompt(server):
    body = {"prompt": ["one", "two"], "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
    status, _, many = await call(server, "POST", "/v1/completions", json=body)
    assert status == 200 and [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    for index, (prompt, offset) in enumerate([("one", 0), ("one", 1), ("two", 0), ("two", 1)]):
        single = {**body, "prompt": prompt, "n": 1, "seed": 5 + offset}
        assert many["choices"][index]["text"] == (await call(server, "POST", "/v1/completions", json=single))[2]["choices"][0]["text"]


async def test_validation_error_in_a_stream_arrives_as_an_event(server):
    body = {"inputs": "hi", "parameters": {"temperature": 0}}
    status, _, text = await call(server, "POST", "/generate_stream", json=body)
    assert status == 200
    assert '"error_type": "validation"' in text and "`temperature` must be strictly positive" in text


async def test_requests_beyond_max_concurrent_get_429_overloaded_and_health_stays_fast(server):
    long = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 500, "ignore_eos": True}}
    running = [asyncio.create_task(call(server, "POST", "/generate", json=long)) for _ in range(2)]
    async with asyncio.timeout(30):  # both admitted and running: the server is saturated (--max-concurrent-requests 2)
        while "tgi_batch_current_size 2.0" not in (await call(server, "GET", "/metrics"))[2]:
            await asyncio.sleep(0.01)
    extra = await asyncio.gather(*(call(server, "POST", "/generate", json=long) for _ in range(8)))
    health_seconds = []
    for _ in range(5):
        started = time.monotonic()
        assert (await call(server, "GET", "/health"))[0] == 200
        health_seconds.append(time.monotonic() - started)
    assert not any(task.done() for task in running), "the long requests ended before the checks"
    assert [status for status, _, _ in await asyncio.gather(*running)] == [200, 200]
    assert all(status == 429 for status, _, _ in extra)
    assert all(payload == {"error": "Model is overloaded", "error_type": "overloaded"} for _, _, payload in extra)
    assert max(health_seconds) < 0.5, health_seconds


async def test_metrics_are_prometheus_text_with_tgi_names(server):
    from prometheus_client.parser import text_string_to_metric_families

    await call(server, "POST", "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    await call(server, "POST", "/generate", json={"inputs": "Hi", "parameters": {"top_k": 0}})
    status, _, text = await call(server, "GET", "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_request_duration",
                 "tgi_request_queue_duration", "tgi_request_inference_duration", "tgi_queue_size",
                 "tgi_batch_current_size", "tgi_batch_max_total_tokens", "tgi_batch_inference_duration",
                 "tgi_batch_forward_duration"):
        assert name in families, name
    failures = {s.labels.get("err"): s.value for s in families["tgi_request_failure"].samples}
    assert failures.get("validation", 0) >= 1
    successes = [s.value for s in families["tgi_request_success"].samples if s.name == "tgi_request_success_total"]
    assert successes[0] >= 1


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory, hf_home, smollm2_tokenizer_dir):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("guard") / "llama")
    args = ("--max-batch-total-tokens", "4096", "--api-key", "s3cret", "--cors-allow-origin", "https://app.example",
            "--payload-limit", "2000")
    with running_server(str(model), hf_home, *args) as server:
        yield server


async def test_api_key_is_required_on_generation_routes_only(guarded_server):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    assert (await call(guarded_server, "POST", "/generate", json=body))[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await call(guarded_server, "POST", "/generate", json=body, headers=wrong))[0] == 401
    right = {"Authorization": "Bearer s3cret"}
    assert (await call(guarded_server, "POST", "/generate", json=body, headers=right))[0] == 200
    assert (await call(guarded_server, "GET", "/health"))[0] == 200
    assert "s3cret" not in guarded_server.log


async def test_cors_allows_the_configured_origin(guarded_server):
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type"}
    status, response_headers, _ = await call(guarded_server, "OPTIONS", "/generate", headers=headers)
    assert status == 200
    assert response_headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_body_over_the_payload_limit_gets_413_json(guarded_server):
    body = {"inputs": "x" * 5000}
    headers = {"Authorization": "Bearer s3cret"}
    status, _, payload = await call(guarded_server, "POST", "/generate", json=body, headers=headers)
    assert status == 413
    assert payload["error_type"] == "validation"


async def test_best_of_returns_the_best_candidate_and_the_others_in_details(server):
    body = {"inputs": "Hello", "parameters": {"best_of": 2, "do_sample": True, "max_new_tokens": 4, "details": True}}
    status, _, payload = await call(server, "POST", "/generate", json=body)
    assert status == 200
    details = payload["details"]
    (other,) = details["best_of_sequences"]
    mean = lambda tokens: sum(t["logprob"] for t in tokens) / len(tokens)  # noqa: E731
    assert mean(details["tokens"]) >= mean(other["tokens"])
    assert details["seed"] != other["seed"]


async def test_decoder_input_details_returns_the_prompt_tokens_with_logprobs(server):
    body = {"inputs": "Hello there friend", "parameters": {"max_new_tokens": 2, "decoder_input_details": True,
                                                          "details": True}}
    status, headers, payload = await call(server, "POST", "/generate", json=body)
    assert status == 200
    prefill = payload["details"]["prefill"]
    assert len(prefill) == int(headers["x-prompt-tokens"])
    assert "".join(token["text"] for token in prefill) == "Hello there friend"
    assert prefill[0]["logprob"] is None
    assert all(token["logprob"] <= 0 for token in prefill[1:])


async def test_watermark_is_accepted_and_deterministic_for_greedy_requests(server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "watermark": True, "details": True}}
    first = await call(server, "POST", "/generate", json=body)
    second = await call(server, "POST", "/generate", json=body)
    plain = await call(server, "POST", "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
    assert first[0] == second[0] == 200
    assert first[2]["generated_text"] == second[2]["generated_text"]
    assert plain[0] == 200


async def test_openapi_document_and_swagger_ui_are_served(server):
    status, _, document = await call(server, "GET", "/api-doc/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    assert "/generate" in document["paths"]
    status, _, page = await call(server, "GET", "/docs")
    assert status == 200 and "swagger-ui" in page
    assert (await call(server, "GET", "/docs/assets/swagger-ui-bundle.js"))[0] == 200


async def test_vertex_ai_env_sets_the_port_and_the_routes(tmp_path, hf_home, smollm2_tokenizer_dir, monkeypatch):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / "llama")
    port = free_port()
    monkeypatch.setenv("AIP_HTTP_PORT", str(port))
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/predict")
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/isalive")
    server = Server(str(model), hf_home, "--max-batch-total-tokens", "4096")
    server.url = f"http://127.0.0.1:{port}"  # AIP_HTTP_PORT wins over --port
    try:
        server.wait_ready()
        assert (await call(server, "GET", "/isalive"))[0] == 200
        body = {"instances": [{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}]}
        status, _, payload = await call(server, "POST", "/predict", json=body)
    finally:
        server.stop()
    assert status == 200 and len(payload["predictions"]) == 1


EOS_PROMPT = "Hello there"


def _greedy_first_token(model_dir, prompt: str) -> int:
    """The token a greedy /generate of `prompt` starts with (tokenized as the router does)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    input_ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt).ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return int(model(torch.tensor([input_ids])).logits[0, -1].argmax())


@pytest.fixture(scope="module")
def eos_server(tmp_path_factory, hf_home, smollm2_tokenizer_dir):
    """A tiny model whose end-of-sequence token is the one greedy decoding of EOS_PROMPT emits first;
    prefix caching off (by TGI's variable)."""
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("eos") / "llama")
    eos_token_id = _greedy_first_token(model, EOS_PROMPT)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    with running_server(str(model), hf_home, "--max-batch-total-tokens", "4096", env={"PREFIX_CACHING": "0"}) as server:
        yield server


async def test_ignore_eos_generates_exactly_max_new_tokens_past_the_eos_token(eos_server):
    parameters = {"max_new_tokens": 6, "details": True}
    _, _, stopped = await call(eos_server, "POST", "/generate", json={"inputs": EOS_PROMPT, "parameters": parameters})
    assert stopped["details"]["finish_reason"] == "eos_token" and stopped["details"]["generated_tokens"] == 1

    body = {"inputs": EOS_PROMPT, "parameters": {**parameters, "ignore_eos": True}}
    status, _, payload = await call(eos_server, "POST", "/generate", json=body)
    assert status == 200
    assert payload["details"]["finish_reason"] == "length" and payload["details"]["generated_tokens"] == 6
    assert payload["details"]["tokens"][0]["id"] == stopped["details"]["tokens"][0]["id"]

    body = {"prompt": EOS_PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, _, completion = await call(eos_server, "POST", "/v1/completions", json=body)
    assert status == 200
    assert completion["choices"][0]["finish_reason"] == "length" and completion["usage"]["completion_tokens"] == 6


async def test_megabyte_tokenize_requests_get_422_or_429_and_health_stays_fast(server):
    """Tokenizing runs off the event loop, within --max-concurrent-requests (2 here), and a text over
    the input limit is a 422 before megabytes of token JSON are built."""
    big = "word " * 200_000  # 1 MB
    bodies = [("/tokenize", {"inputs": big})] * 3 + [("/chat_tokenize", {"messages": [{"role": "user", "content": big}]})]
    async with aiohttp.ClientSession() as session:

        async def post(path, body):
            async with session.post(server.url + path, json=body) as response:
                return response.status, await response.json()

        calls = [asyncio.create_task(post(path, body)) for path, body in bodies]
        slowest = 0.0
        while not all(call.done() for call in calls):
            started = time.monotonic()
            async with session.get(server.url + "/health") as response:
                assert response.status == 200
            slowest = max(slowest, time.monotonic() - started)
        results = [await call for call in calls]
        async with session.post(server.url + "/tokenize", json={"inputs": "Hello world"}) as response:
            small = await response.json()
    statuses = [status for status, _ in results]
    assert set(statuses) <= {422, 429} and statuses.count(422) >= 2, results
    assert all("must have less than 511 tokens" in payload["error"] for status, payload in results if status == 422)
    assert slowest < 0.5, slowest  # tokenizing 1 MB takes seconds; a busy 2-core CI machine adds ~0.1 s
    assert "".join(token["text"] for token in small) == "Hello world"


# Prefix caching. The server's KV blocks hold 16 tokens; with "Prefix one. " before it, this prompt is 42 tokens long.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence. " * 2
CACHED = 32  # whole blocks short of the last token


async def generate_details(server, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 2, "details": True, **parameters}}
    status, _, payload = await call(server, "POST", "/generate", json=body)
    assert status == 200, payload
    return payload["details"]


async def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_says_so_everywhere(server):
    prompt = "Prefix one. " + LONG_PROMPT
    _, _, tokens = await call(server, "POST", "/tokenize", json={"inputs": prompt})
    assert len(tokens) == 42
    first = await generate_details(server, prompt)
    again = await generate_details(server, prompt)
    assert (first["cached_tokens"], again["cached_tokens"]) == (0, CACHED)
    assert again["tokens"] == first["tokens"]

    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    _, _, completion = await call(server, "POST", "/v1/completions", json=body)
    assert completion["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 2, "details": True}}
    _, _, events = await call(server, "POST", "/generate_stream", json=body)
    last = json.loads(events.strip().split("\n")[-1].removeprefix("data:"))
    assert last["details"]["cached_tokens"] == CACHED

    _, _, info = await call(server, "GET", "/info")
    assert info["prefix_caching"] is True
    _, _, text = await call(server, "GET", "/metrics")
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values["tgi_request_prompt_tokens_cached_total"] >= 3 * CACHED
    assert values["tgi_request_prompt_tokens_computed_total"] >= 42
    assert 0 < values["tgi_prefix_cache_hit_rate"] < 1
    assert values["tgi_prefix_cache_free_blocks"] >= 2


async def test_the_best_of_candidates_compute_their_prompt_once(server):
    details = await generate_details(server, "Prefix two. " + LONG_PROMPT, best_of=2, do_sample=True)
    (other,) = details["best_of_sequences"]
    assert sorted([details["cached_tokens"], other["cached_tokens"]]) == [0, CACHED]


async def test_prefix_caching_off_computes_every_prompt_in_full(eos_server):
    _, _, info = await call(eos_server, "GET", "/info")
    assert info["prefix_caching"] is False
    for _ in range(2):
        assert (await generate_details(eos_server, "Prefix three. " + LONG_PROMPT))["cached_tokens"] == 0
