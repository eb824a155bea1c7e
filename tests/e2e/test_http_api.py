"""The HTTP surface on a tiny random Llama: headers, tokenization routes, cloud routes, errors."""

from __future__ import annotations

import asyncio

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


@pytest.mark.parametrize(
    "kwargs, status, error_type",
    [
        ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "validation"),
        ({"data": "inputs=hi", "headers": {"Content-Type": "text/plain"}}, 415, "validation"),
        ({"json": {"inputs": "hi", "parameters": {"top_p": 1.0}}}, 422, "validation"),
        ({"json": {"inputs": "hi", "parameters": {"max_new_tokens": "many"}}}, 422, "validation"),
        ({"json": {"inputs": "hi", "parameters": {"max_new_tokens": 600}}}, 422, "validation"),
        ({"json": ["inputs"]}, 422, "validation"),
    ],
)
async def test_bad_requests_get_tgi_error_json_never_500(server, kwargs, status, error_type):
    got_status, _, payload = await call(server, "POST", "/generate", **kwargs)
    assert got_status == status
    assert payload["error_type"] == error_type and payload["error"]


async def test_validation_error_in_a_stream_arrives_as_an_event(server):
    body = {"inputs": "hi", "parameters": {"temperature": 0}}
    status, _, text = await call(server, "POST", "/generate_stream", json=body)
    assert status == 200
    assert '"error_type": "validation"' in text and "`temperature` must be strictly positive" in text


async def test_requests_beyond_max_concurrent_get_429_overloaded(server):
    long = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 400}}
    results = await asyncio.gather(*(call(server, "POST", "/generate", json=long) for _ in range(4)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) >= 1 and 429 in statuses
    overloaded = next(payload for status, _, payload in results if status == 429)
    assert overloaded == {"error": "Model is overloaded", "error_type": "overloaded"}


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
