"""The OpenAPI 3.1 document of every route (`/api-doc/openapi.json`) and Swagger UI (`/docs`).

Swagger UI's files come from the PyPI package swagger-ui-bundle and are served locally, so the page
works without internet access.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from tgi_router.app import get_router
from tgi_router.parameters import BY_NAME, PARAMETERS, Parameter


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: dict) -> dict:
    """`schema` or JSON null (OpenAPI 3.1 spells it as JSON Schema does)."""
    if "type" in schema and "enum" not in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _array(items: dict, **constraints) -> dict:
    return {"type": "array", "items": items, **constraints}


def _parameter_schema(parameter: Parameter) -> dict:
    """A generate parameter's schema, from the table validation parses with."""
    if parameter.kind == "strings":
        schema = {"type": "array", "items": {"type": "string"}}
    else:
        schema = {"type": parameter.kind}
    if parameter.integer_range is not None:
        schema["minimum"], schema["maximum"] = parameter.integer_range
    schema.update(parameter.schema, description=parameter.description)
    return _nullable(schema) if parameter.nullable else schema


INT, NUM, STR, BOOL = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}
NON_EMPTY_STR = {"type": "string", "minLength": 1}
U32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
POSITIVE_U32 = {**U32, "minimum": 1}
CACHED_TOKENS = {"type": "integer", "minimum": 0,
                 "description": "Prompt tokens whose KV came from the prefix cache instead of being computed."}
FINISH_REASON = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}

TOKEN = _obj({"id": INT, "text": STR, "logprob": _nullable(NUM), "special": BOOL}, ("id", "text", "special"))
PREFILL_TOKEN = _obj({"id": INT, "text": STR, "logprob": _nullable(NUM)}, ("id", "text"))
SEQUENCE = {
    "finish_reason": FINISH_REASON, "generated_tokens": INT, "seed": _nullable(INT), "cached_tokens": CACHED_TOKENS,
    "prefill": _array(_ref("PrefillToken")),
    "tokens": _array(_ref("Token")),
    "top_tokens": _array(_array(_ref("Token"))),
}
SIMPLE_TOKEN = _obj({"id": INT, "text": STR, "start": INT, "stop": INT}, ("id", "text", "start", "stop"))
TEXT_PART = _obj({"type": {"type": "string", "enum": ["text"]}, "text": STR}, ("type", "text"))
FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
# A call as OpenAI writes it: its arguments are JSON text.
TOOL_CALL = _obj({"id": STR, "type": {"type": "string", "enum": ["function"]},
                  "function": _obj({"name": STR, "arguments": STR}, ("name", "arguments"))}, ("id", "type", "function"))
MESSAGE = _obj({"role": STR, "content": _nullable({"anyOf": [STR, _array(TEXT_PART)]}), "name": _nullable(STR),
                "tool_calls": _nullable(_array(TOOL_CALL)), "tool_call_id": _nullable(STR)},
               ("role",))
TOOL = _obj({"type": {"type": "string", "enum": ["function"]}, "function": _obj({
    "name": FUNCTION_NAME, "description": _nullable(STR), "parameters": _nullable({"type": "object"}),
    "strict": _nullable(BOOL)}, ("name",))}, ("type", "function"))
TOOL_CHOICE = {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, _obj({
    "type": {"type": "string", "enum": ["function"]}, "function": _obj({"name": FUNCTION_NAME}, ("name",))},
    ("type", "function"))]}
REASONING = {"type": "string", "description": "A reasoning model's thoughts (its <think> text), apart from content."}
# A streamed call: the first delta of a call has its id, type and name; later ones more arguments.
TOOL_CALL_DELTA = _obj({"index": INT, "id": STR, "type": {"type": "string", "enum": ["function"]},
                        "function": _obj({"name": STR, "arguments": STR}, ("arguments",))}, ("index", "function"))
# The value constraints below are those validation enforces whatever the server's flags; limits set
# by flags (max_best_of, max_stop_sequences, max_top_n_tokens, token budgets) are in /info.
OPENAI_SAMPLING = {
    "model": _nullable(STR), "max_tokens": _nullable(POSITIVE_U32), "max_completion_tokens": _nullable(POSITIVE_U32),
    "temperature": _nullable({"type": "number", "minimum": 0}), "stop": _nullable({"anyOf": [STR, _array(STR)]}),
    "stream": BOOL,
    **{name: _parameter_schema(BY_NAME[name]) for name in ("top_p", "seed", "frequency_penalty", "ignore_eos", "min_p",
                                                           "logit_bias")},
    "n": _nullable({"type": "integer", "minimum": 1, "description": "Choices per prompt (prompts x n at most "
                    "max_client_batch_size, in /info)."}),
}
USAGE = _obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT,
              "prompt_tokens_details": _obj({"cached_tokens": CACHED_TOKENS}, ("cached_tokens",))},
             ("prompt_tokens", "completion_tokens", "total_tokens"))
HEAD = {"object": STR, "id": STR, "created": INT, "model": STR, "system_fingerprint": STR}
OPENAI_LOGPROBS = _nullable(_obj({"content": _array(_obj({
    "token": STR, "logprob": _nullable(NUM), "top_logprobs": _array(_obj({"token": STR, "logprob": _nullable(NUM)}))}))}))
# OpenAI's completions logprobs (`logprobs: n`): per token, its text, logprob, n alternatives, offset.
COMPLETION_LOGPROBS = _nullable(_obj({
    "tokens": _array(STR), "token_logprobs": _array(_nullable(NUM)),
    "top_logprobs": _array({"type": "object", "additionalProperties": _nullable(NUM)}), "text_offset": _array(INT)}))
# An error after an OpenAI stream started: TGI sends it as an event of its own.
OPENAI_STREAM_ERROR = _obj({"error": _obj({"message": STR, "http_status_code": INT}, ("message",))}, ("error",))

SCHEMAS = {
    "GenerateParameters": _obj({p.name: _parameter_schema(p) for p in PARAMETERS}),
    "GenerateRequest": _obj({"inputs": NON_EMPTY_STR, "parameters": _ref("GenerateParameters")}, ("inputs",)),
    "CompatGenerateRequest": _obj({"inputs": NON_EMPTY_STR, "parameters": _ref("GenerateParameters"),
                                   "stream": BOOL}, ("inputs",)),
    "Token": TOKEN,
    "PrefillToken": PREFILL_TOKEN,
    "BestOfSequence": _obj({"generated_text": STR, **SEQUENCE},
                           ("generated_text", "finish_reason", "generated_tokens", "prefill", "tokens")),
    "Details": _obj({**SEQUENCE, "best_of_sequences": _array(_ref("BestOfSequence"))},
                    ("finish_reason", "generated_tokens", "prefill", "tokens")),
    "GenerateResponse": _obj({"generated_text": STR, "details": _ref("Details")}, ("generated_text",)),
    "StreamResponse": _obj({
        "index": INT, "token": _ref("Token"), "top_tokens": _array(_ref("Token")),
        "generated_text": _nullable(STR),
        "details": _nullable(_obj({"finish_reason": FINISH_REASON, "generated_tokens": INT,
                                   "seed": _nullable(INT), "input_length": INT,
                                   "cached_tokens": CACHED_TOKENS})),
    }, ("index", "token")),
    "ErrorResponse": _obj({"error": STR, "error_type": STR}, ("error", "error_type")),
    "Info": _obj({
        "model_id": STR, "model_sha": _nullable(STR), "model_pipeline_tag": _nullable(STR),
        "max_concurrent_requests": INT, "max_best_of": INT, "max_stop_sequences": INT, "max_input_tokens": INT,
        "max_total_tokens": INT, "validation_workers": INT, "max_client_batch_size": INT, "router": STR,
        "version": STR, "sha": _nullable(STR), "docker_label": _nullable(STR),
        "model_dtype": STR, "model_device_type": STR, "kv_cache_dtype": STR, "max_batch_total_tokens": INT,
        "num_shard": INT, "model_implementation": STR, "prefix_caching": BOOL,
        "quantize": _nullable({"type": "string", "description": "The weights' quantization (--quantize), or null."}),
        "speculate": _nullable({"type": "integer", "description": "Tokens proposed per step by speculative decoding (--speculate), or null when off."}),
        "lora_adapters": _array(STR),
        "max_loras": {"type": "integer", "minimum": 0, "description": "GPU slots for LoRA adapters (--max-loras); 0: LoRA is off."},
        "speculative_model": _nullable({"type": "string", "description": "The architecture of the draft model proposing them (--speculative-model), or null for n-gram proposals or none."}),
    }),
    "SimpleToken": SIMPLE_TOKEN,
    "ChatRequest": _obj({
        "messages": _array(MESSAGE, minItems=1), **OPENAI_SAMPLING, "logprobs": _nullable(BOOL),
        "top_logprobs": _nullable(U32), "presence_penalty": _nullable({"type": "number", "exclusiveMinimum": -2}),
        "stream_options": _nullable(_obj({"include_usage": BOOL})),
        "response_format": _nullable(_obj({
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema", "json", "regex"]},
            "json_schema": _obj({"name": STR, "schema": {"type": "object"}, "strict": _nullable(BOOL)}),
            "value": {},
        }, ("type",))),
        "tools": _nullable(_array(TOOL, minItems=1)), "tool_choice": _nullable(TOOL_CHOICE),
        "parallel_tool_calls": _nullable(BOOL),
        "chat_template_kwargs": _nullable({"type": "object", "description": "More variables for the chat "
                                           "template, e.g. {\"enable_thinking\": false} for Qwen3."}),
    }, ("messages",)),
    "ChatCompletion": _obj({**HEAD, "choices": _array(_obj({
        "index": INT, "message": _obj({"role": STR, "content": _nullable(STR), "tool_calls": _array(TOOL_CALL),
                                  "reasoning_content": REASONING}),
        "logprobs": OPENAI_LOGPROBS, "finish_reason": STR})), "usage": USAGE}),
    "ChatCompletionChunk": _obj({**HEAD, "choices": _array(_obj({
        "index": INT, "delta": _obj({"role": STR, "content": STR, "tool_calls": _array(TOOL_CALL_DELTA),
                                "reasoning_content": REASONING}),
        "logprobs": OPENAI_LOGPROBS,
        "finish_reason": _nullable(STR)})), "usage": _nullable(USAGE)}, ("choices",)),
    "CompletionRequest": _obj({"prompt": {"anyOf": [NON_EMPTY_STR, _array(NON_EMPTY_STR, minItems=1)]},
                               **OPENAI_SAMPLING, "repetition_penalty": _parameter_schema(BY_NAME["repetition_penalty"]),
                               "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 5}),
                               "suffix": {"type": "null"}}, ("prompt",)),
    "Completion": _obj({**HEAD, "choices": _array(_obj({
        "index": INT, "text": STR, "logprobs": COMPLETION_LOGPROBS, "finish_reason": STR})), "usage": USAGE}),
    "CompletionChunk": _obj({**HEAD, "choices": _array(_obj({
        "index": INT, "text": STR, "logprobs": COMPLETION_LOGPROBS, "finish_reason": STR}))}, ("choices",)),
    "ModelList": _obj({"object": STR, "data": _array(_obj({"id": STR, "object": STR, "created": INT, "owned_by": STR,
                                                           "parent": {"type": "string", "description": "For a LoRA adapter: its base model."}}))}),
    "ChatTokenizeResponse": _obj({"tokenize_response": _array(_ref("SimpleToken")), "templated_text": STR}),
    "VertexInstance": _obj({"inputs": NON_EMPTY_STR, "parameters": _nullable(_ref("GenerateParameters"))},
                           ("inputs",)),
    "VertexRequest": _obj({"instances": _array({"anyOf": [_ref("VertexInstance"), _ref("ChatRequest")]}, minItems=1)},
                          ("instances",)),
    "VertexResponse": _obj({"predictions": _array(STR)}),
}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _sse(*events: dict) -> dict:
    """An event stream whose `data:` lines are JSON matching one of `events`, or OpenAI's `[DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": list(events)}}
    if OPENAI_STREAM_ERROR in events:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"text/event-stream": {"schema": _obj({"data": data, "event": STR, "id": STR, "retry": INT}, ("data",))}}


# Every POST route: malformed JSON (400), a body over --payload-limit (413), not JSON (415), invalid
# values (422), and 503 while the server shuts down. Generation adds 424 (a shard failed) and 429.
REQUEST_ERRORS = (400, 413, 415, 422, 503)
GENERATION_ERRORS = (*REQUEST_ERRORS, 424, 429)


def _responses(ok: dict, description: str, errors: tuple[int, ...] = GENERATION_ERRORS) -> dict:
    responses = {"200": {"description": description, "content": ok}}
    for status in errors:
        responses[str(status)] = {"description": "TGI error", "content": _json(_ref("ErrorResponse"))}
    return responses


def _post(summary: str, request: dict, ok: dict, errors: tuple[int, ...] = GENERATION_ERRORS) -> dict:
    body = {"required": True, "content": _json(request)}
    return {"post": {"summary": summary, "requestBody": body, "responses": _responses(ok, summary, errors)}}


def _get(summary: str, ok: dict | None) -> dict:
    responses = {"200": {"description": summary, **({"content": ok} if ok else {})}}
    if ok is None:
        responses["503"] = {"description": "unhealthy", "content": _json(_ref("ErrorResponse"))}
    return {"get": {"summary": summary, "responses": responses}}


GENERATE_SSE = _sse(_ref("StreamResponse"), _ref("ErrorResponse"))
CHAT_SSE = _sse(_ref("ChatCompletionChunk"), OPENAI_STREAM_ERROR)
COMPLETION_SSE = _sse(_ref("CompletionChunk"), OPENAI_STREAM_ERROR)
INVOCATION_SSE = _sse(_ref("StreamResponse"), _ref("ErrorResponse"), _ref("ChatCompletionChunk"),
                      _ref("CompletionChunk"), OPENAI_STREAM_ERROR)
GENERATE_LIST = {**_json(_array(_ref("GenerateResponse"))), **GENERATE_SSE}
INVOCATION = {"anyOf": [_ref("CompatGenerateRequest"), _ref("ChatRequest"), _ref("CompletionRequest")]}
PATHS = {
    "/": {**_post("Generate (a one-element list), or stream with `stream: true`", _ref("CompatGenerateRequest"),
                  GENERATE_LIST),
          "get": {"summary": "The chat playground (an HTML page), with the health check's status",
                  "responses": {"200": {"description": "the page; the shards are healthy", "content": {"text/html": {"schema": {"type": "string"}}}},
                                "503": {"description": "the page; a shard is unhealthy", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    "/generate": _post("Generate text", _ref("GenerateRequest"), _json(_ref("GenerateResponse"))),
    "/generate_stream": _post("Generate a stream of tokens (SSE of StreamResponse)", _ref("GenerateRequest"),
                              GENERATE_SSE),
    "/v1/chat/completions": _post("OpenAI chat completions", _ref("ChatRequest"),
                                  {**_json(_ref("ChatCompletion")), **CHAT_SSE}),
    "/v1/completions": _post("OpenAI completions", _ref("CompletionRequest"),
                             {**_json(_ref("Completion")), **COMPLETION_SSE}),
    "/v1/models": _get("Models served", _json(_ref("ModelList"))),
    "/v1/load_lora_adapter": _post(
        "Load a LoRA adapter at run time (vLLM's route); 400 when it cannot be read, does not fit the model, "
        "its name is taken, or LoRA is off", _obj({"lora_name": STR, "lora_path": STR}, ("lora_name", "lora_path")),
        {"text/plain": {"schema": STR}}, REQUEST_ERRORS),
    "/v1/unload_lora_adapter": _post(
        "Unload a LoRA adapter (vLLM's route), once the requests using it are done; 404 when none has that name",
        _obj({"lora_name": STR}, ("lora_name",)), {"text/plain": {"schema": STR}}, (*REQUEST_ERRORS, 404)),
    "/tokenize": _post("Tokenize inputs", _ref("GenerateRequest"), _json(_array(_ref("SimpleToken"))), REQUEST_ERRORS),
    "/chat_tokenize": _post("Render the chat template and tokenize it", _ref("ChatRequest"),
                            _json(_ref("ChatTokenizeResponse")), REQUEST_ERRORS),
    "/invocations": _post("SageMaker: a generate, chat or completion request", INVOCATION,
                          {**_json({"anyOf": [_array(_ref("GenerateResponse")), _ref("ChatCompletion"),
                                              _ref("Completion")]}), **INVOCATION_SSE}),
    "/vertex": _post("Vertex AI predictions", _ref("VertexRequest"), _json(_ref("VertexResponse"))),
    "/health": _get("Health", None),
    "/ping": _get("Health", None),
    "/info": _get("Model facts and limits", _json(_ref("Info"))),
    "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": STR}}),
}


def openapi_document(version: str) -> dict:
    return {
        "openapi": "3.1.0",
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
    # Only the bundle's own files, by name: any other name is a 404 (a static route would try the
    # file system with whatever name it gets).
    name_to_file = {path.name: path for path in Path(swagger_ui_path).iterdir() if path.is_file()}

    async def asset(request: web.Request) -> web.FileResponse:
        path = name_to_file.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/docs/assets/{name}", asset)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(get_router(request).info["version"]))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")
