"""TGI's native routes: `/generate`, `/generate_stream`, `POST /` (compat), `/health`, `/info`."""

from __future__ import annotations

import json
import math

from aiohttp import web
from aiohttp_sse import sse_response

from tgi_router.app import Router, get_router, read_json
from tgi_router.engine import RequestStream, Token, TokenEvent
from tgi_router.errors import InferError, UnhealthyError
from tgi_router.validation import ValidRequest, parse_generate_request


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/", health)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)


async def generate(request: web.Request, is_compat: bool = False) -> web.Response:
    router = get_router(request)
    body = await read_json(request)
    with router.admit():
        valid = await _validate(router, body, is_compat=is_compat)
        events = await collect(router.submit(valid))
    return web.json_response(_generate_response(valid, events))


async def generate_stream(request: web.Request, is_compat: bool = False) -> web.StreamResponse:
    router = get_router(request)
    body = await read_json(request)
    sse_headers = {"X-Accel-Buffering": "no"}
    async with sse_response(request, headers=sse_headers, sep="\n", allow_all_methods=True) as sse:
        try:
            with router.admit():
                valid = await _validate(router, body, is_stream=True, is_compat=is_compat)
                stream = router.submit(valid)
                try:
                    await _send_events(sse, valid, stream)
                finally:
                    stream.cancel()
        except InferError as error:  # TGI reports stream errors as an event, with HTTP 200
            await sse.send(_json(error.to_json()))
    return sse


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """`POST /`: `/generate` answering a one-element list, or `/generate_stream` when `stream` is true."""
    body = await read_json(request)
    if body.get("stream") is True:
        return await generate_stream(request, is_compat=True)
    response = await generate(request, is_compat=True)
    return web.Response(body=b"[" + response.body + b"]", content_type="application/json")


async def health(request: web.Request) -> web.Response:
    router = get_router(request)
    try:
        await router.engine.shards.health()
    except Exception as error:  # any shard failure means unhealthy
        raise UnhealthyError() from error
    return web.Response()


async def info(request: web.Request) -> web.Response:
    return web.json_response(get_router(request).info)


async def _validate(router: Router, body: dict, is_stream: bool = False, is_compat: bool = False) -> ValidRequest:
    # `POST /` returns the prompt with the text by default, as TGI does for text-generation models.
    return await router.validate(parse_generate_request(body), is_stream, default_return_full_text=is_compat)


async def collect(stream: RequestStream) -> list[TokenEvent]:
    """All events of a request; the request is cancelled if the caller goes away first."""
    try:
        return [event async for event in stream]
    finally:
        stream.cancel()


async def _send_events(sse, valid: ValidRequest, stream: RequestStream) -> None:
    index = 0
    async for event in stream:
        index += 1
        message = {"index": index, "token": _token_json(event.token), "generated_text": None, "details": None}
        if valid.top_n_tokens:
            message["top_tokens"] = [_token_json(t) for t in event.top_tokens]
        if event.finish_reason is not None:
            message["generated_text"] = _full_text(valid, event.generated_text)
            if valid.details:
                message["details"] = {
                    "finish_reason": event.finish_reason.value,
                    "generated_tokens": index,
                    "seed": _seed(valid),
                    "input_length": len(valid.input_ids),
                }
        await sse.send(_json(message))


def _generate_response(valid: ValidRequest, events: list[TokenEvent]) -> dict:
    last = events[-1]
    response = {"generated_text": _full_text(valid, last.generated_text)}
    if valid.details:
        details = {
            "finish_reason": last.finish_reason.value,
            "generated_tokens": len(events),
            "seed": _seed(valid),
            "prefill": [],
            "tokens": [_token_json(e.token) for e in events],
        }
        if valid.top_n_tokens:
            details["top_tokens"] = [[_token_json(t) for t in e.top_tokens] for e in events]
        response["details"] = details
    return response


def _full_text(valid: ValidRequest, generated_text: str) -> str:
    return valid.inputs + generated_text if valid.return_full_text else generated_text


def _seed(valid: ValidRequest) -> int | None:
    return valid.sampling.seed if valid.sampling.do_sample else None


def _token_json(token: Token) -> dict:
    logprob = None if math.isnan(token.logprob) else token.logprob
    return {"id": token.id, "text": token.text, "logprob": logprob, "special": token.special}


def _json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False)
