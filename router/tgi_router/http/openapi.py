"""The OpenAPI 3 document of every route (`/api-doc/openapi.json`) and Swagger UI (`/docs`).

Swagger UI's files come from the PyPI package swagger-ui-bundle and are served locally, so the page
works without internet access.
"""

from __future__ import annotations

from aiohttp import web

from tgi_router.app import get_router


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


INT, NUM, STR, BOOL = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}
FINISH_REASON = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}

TOKEN = _obj({"id": INT, "text": STR, "logprob": _nullable(NUM), "special": BOOL}, ("id", "text", "special"))
PREFILL_TOKEN = _obj({"id": INT, "text": STR, "logprob": _nullable(NUM)}, ("id", "text"))
SEQUENCE = {
    "finish_reason": FINISH_REASON, "generated_tokens": INT, "seed": _nullable(INT),
    "prefill": {"type": "array", "items": _ref("PrefillToken")},
    "tokens": {"type": "array", "items": _ref("Token")},
    "top_tokens": {"type": "array", "items": {"type": "array", "items": _ref("Token")}},
}
SIMPLE_TOKEN = _obj({"id": INT, "text": STR, "start": INT, "stop": INT}, ("id", "text", "start", "stop"))
MESSAGE = _obj({"role": STR, "content": {"oneOf": [STR, {"type": "array", "items": _obj({"type": STR, "text": STR})}]},
                "name": STR}, ("role",))
OPENAI_SAMPLING = {
    "model": STR, "max_tokens": _nullable(INT), "temperature": _nullable(NUM), "top_p": _nullable(NUM),
    "seed": _nullable(INT), "stop": {"oneOf": [STR, {"type": "array", "items": STR}]},
    "stream": BOOL, "frequency_penalty": _nullable(NUM),
}
USAGE = _obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT})
HEAD = {"object": STR, "id": STR, "created": INT, "model": STR, "system_fingerprint": STR}

SCHEMAS = {
    "GenerateParameters": _obj({
        "best_of": _nullable(INT), "temperature": _nullable(NUM), "repetition_penalty": _nullable(NUM),
        "frequency_penalty": _nullable(NUM), "top_k": _nullable(INT), "top_p": _nullable(NUM),
        "typical_p": _nullable(NUM), "do_sample": BOOL, "max_new_tokens": _nullable(INT),
        "return_full_text": _nullable(BOOL), "stop": {"type": "array", "items": STR}, "truncate": _nullable(INT),
        "watermark": BOOL, "details": BOOL, "decoder_input_details": BOOL, "seed": _nullable(INT),
        "top_n_tokens": _nullable(INT), "grammar": _nullable({"type": "object"}), "adapter_id": _nullable(STR),
    }),
    "GenerateRequest": _obj({"inputs": STR, "parameters": _ref("GenerateParameters")}, ("inputs",)),
    "CompatGenerateRequest": _obj({"inputs": STR, "parameters": _ref("GenerateParameters"), "stream": BOOL},
                                  ("inputs",)),
    "Token": TOKEN,
    "PrefillToken": PREFILL_TOKEN,
    "BestOfSequence": _obj({"generated_text": STR, **SEQUENCE}),
    "Details": _obj({**SEQUENCE, "best_of_sequences": {"type": "array", "items": _ref("BestOfSequence")}},
                    ("finish_reason", "generated_tokens", "prefill", "tokens")),
    "GenerateResponse": _obj({"generated_text": STR, "details": _ref("Details")}, ("generated_text",)),
    "StreamResponse": _obj({
        "index": INT, "token": _ref("Token"), "top_tokens": {"type": "array", "items": _ref("Token")},
        "generated_text": _nullable(STR),
        "details": _nullable(_obj({"finish_reason": FINISH_REASON, "generated_tokens": INT,
                                   "seed": _nullable(INT), "input_length": INT})),
    }, ("index", "token")),
    "ErrorResponse": _obj({"error": STR, "error_type": STR}, ("error", "error_type")),
    "Info": _obj({
        "model_id": STR, "model_sha": _nullable(STR), "model_pipeline_tag": _nullable(STR),
        "max_concurrent_requests": INT, "max_best_of": INT, "max_stop_sequences": INT, "max_input_tokens": INT,
        "max_total_tokens": INT, "validation_workers": INT, "max_client_batch_size": INT, "router": STR,
        "version": STR, "sha": _nullable(STR), "docker_label": _nullable(STR),
    }),
    "SimpleToken": SIMPLE_TOKEN,
    "ChatRequest": _obj({
        "messages": {"type": "array", "items": MESSAGE}, **OPENAI_SAMPLING, "logprobs": BOOL,
        "top_logprobs": _nullable(INT), "presence_penalty": _nullable(NUM),
        "stream_options": _obj({"include_usage": BOOL}),
    }, ("messages",)),
    "ChatCompletion": _obj({**HEAD, "choices": {"type": "array", "items": _obj({
        "index": INT, "message": _obj({"role": STR, "content": STR}), "logprobs": _nullable({"type": "object"}),
        "finish_reason": STR})}, "usage": USAGE}),
    "ChatCompletionChunk": _obj({**HEAD, "choices": {"type": "array", "items": _obj({
        "index": INT, "delta": _obj({"role": STR, "content": STR}), "logprobs": _nullable({"type": "object"}),
        "finish_reason": _nullable(STR)})}, "usage": _nullable(USAGE)}),
    "CompletionRequest": _obj({"prompt": {"oneOf": [STR, {"type": "array", "items": STR}]}, **OPENAI_SAMPLING,
                               "repetition_penalty": _nullable(NUM), "suffix": _nullable(STR)}, ("prompt",)),
    "Completion": _obj({**HEAD, "choices": {"type": "array", "items": _obj({
        "index": INT, "text": STR, "logprobs": _nullable({"type": "object"}), "finish_reason": STR})},
        "usage": USAGE}),
    "ModelList": _obj({"object": STR, "data": {"type": "array", "items": _obj(
        {"id": STR, "object": STR, "created": INT, "owned_by": STR})}}),
    "ChatTokenizeResponse": _obj({"tokenize_response": {"type": "array", "items": _ref("SimpleToken")},
                                  "templated_text": STR}),
    "VertexRequest": _obj({"instances": {"type": "array", "items": _ref("GenerateRequest")}}, ("instances",)),
    "VertexResponse": _obj({"predictions": {"type": "array", "items": STR}}),
}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _responses(ok: dict, description: str, errors: tuple[int, ...] = (422, 424, 429)) -> dict:
    responses = {"200": {"description": description, "content": ok}}
    for status in errors:
        responses[str(status)] = {"description": "TGI error", "content": _json(_ref("ErrorResponse"))}
    return responses


def _post(summary: str, request: str, ok: dict, errors: tuple[int, ...] = (422, 424, 429)) -> dict:
    body = {"required": True, "content": _json(_ref(request))}
    return {"post": {"summary": summary, "requestBody": body, "responses": _responses(ok, summary, errors)}}


def _get(summary: str, ok: dict | None) -> dict:
    responses = {"200": {"description": summary, **({"content": ok} if ok else {})}}
    if ok is None:
        responses["503"] = {"description": "unhealthy", "content": _json(_ref("ErrorResponse"))}
    return {"get": {"summary": summary, "responses": responses}}


SSE = {"text/event-stream": {"schema": STR}}
GENERATE_LIST = {**_json({"type": "array", "items": _ref("GenerateResponse")}), **SSE}
PATHS = {
    "/": {**_post("Generate (a one-element list), or stream with `stream: true`", "CompatGenerateRequest",
                  GENERATE_LIST), **_get("Health", None)},
    "/generate": _post("Generate text", "GenerateRequest", _json(_ref("GenerateResponse"))),
    "/generate_stream": _post("Generate a stream of tokens (SSE of StreamResponse)", "GenerateRequest", SSE),
    "/v1/chat/completions": _post("OpenAI chat completions", "ChatRequest",
                                  {**_json(_ref("ChatCompletion")), **SSE}),
    "/v1/completions": _post("OpenAI completions", "CompletionRequest", {**_json(_ref("Completion")), **SSE}),
    "/v1/models": _get("Models served", _json(_ref("ModelList"))),
    "/tokenize": _post("Tokenize inputs", "GenerateRequest", _json({"type": "array", "items": _ref("SimpleToken")}),
                       (422,)),
    "/chat_tokenize": _post("Render the chat template and tokenize it", "ChatRequest",
                            _json(_ref("ChatTokenizeResponse")), (422,)),
    "/invocations": _post("SageMaker: a generate, chat or completion request", "CompatGenerateRequest",
                          GENERATE_LIST),
    "/vertex": _post("Vertex AI predictions", "VertexRequest", _json(_ref("VertexResponse")), (422, 500)),
    "/health": _get("Health", None),
    "/ping": _get("Health", None),
    "/info": _get("Model facts and limits", _json(_ref("Info"))),
    "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": STR}}),
}


def openapi_document(version: str) -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Text Generation Inference", "version": version,
                 "description": "TGI-compatible text generation server"},
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }


DOCS_PAGE = """<!doctype html>
<html><head><title>Text Generation Inference API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/api-doc/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


def add_routes(app: web.Application) -> None:
    from swagger_ui_bundle import swagger_ui_path

    app.router.add_get("/api-doc/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_static("/docs/assets", swagger_ui_path)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(get_router(request).info["version"]))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")
