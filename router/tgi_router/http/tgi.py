"""TGI's native routes: `/generate`, `/generate_stream`, `POST /` (compat), `/health`, `/info`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time

from aiohttp import web

from tgi_router.app import Router, add_post, count_failure, get_router, read_json, stream_headers, timing_headers
from tgi_router.engine import RequestStream, Token, TokenEvent
from tgi_router.errors import InferError, UnhealthyError, ValidationError
from tgi_router.http.events import event_json, open_event_stream
from tgi_router.tokenizer import TooManyTokensError
from tgi_router.validation import ValidRequest, parse_generate_request, validate_inputs, validate_parameters


def add_routes(app: web.Application) -> None:
    add_post(app, "/generate", generate)
    add_post(app, "/generate_stream", generate_stream)
    add_post(app, "/", compat_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/info", info)
    add_post(app, "/tokenize", tokenize)
    app.router.add_get("/metrics", metrics)


async def generate(request: web.Request, is_compat: bool = False) -> web.Response:
    started_at = time.monotonic()
    router = get_router(request)
    body = await read_json(request)
    with router.admit():
        valid = await _validate(router, body, is_compat=is_compat)
        validated_at = time.monotonic()
        candidates = [with_seed(valid, random.getrandbits(64)) for _ in range(1, valid.best_of)]
        streams = [router.submit(v) for v in [valid, *candidates]]
        results = await collect_all(streams)
    # best_of: the candidate with the highest mean token logprob answers; the others come along.
    ranked = sorted(zip([valid, *candidates], streams, results), key=lambda c: -_mean_logprob(c[2]))
    (best, stream, events), others = ranked[0], ranked[1:]
    response = _generate_response(router, best, stream, events)
    if others and best.details:
        response["details"]["best_of_sequences"] = [_sequence_json(router, v, s, e) for v, s, e in others]
    headers = timing_headers(router, best, stream, started_at, validated_at)
    return web.json_response(response, headers=headers)


async def generate_stream(request: web.Request, is_compat: bool = False) -> web.StreamResponse:
    started_at = time.monotonic()
    router = get_router(request)
    # A body of the wrong shape is a 422, as TGI's JSON extractor answers; value errors come as an event.
    parsed = parse_generate_request(await read_json(request))
    headers = stream_headers(router, len(parsed.inputs))
    async with open_event_stream(request, headers) as sse:
        try:
            with router.admit():
                valid = await router.validate(parsed, is_stream=True, default_return_full_text=is_compat)
                validated_at = time.monotonic()
                stream = router.submit(valid)
                try:
                    await _send_events(sse, valid, stream)
                finally:
                    stream.cancel()
                timing_headers(router, valid, stream, started_at, validated_at)  # records the metrics
        except InferError as error:  # TGI reports stream errors as an event, with HTTP 200
            count_failure(router, error)
            await sse.send(event_json(error.to_json()))
    return sse


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """`POST /`: `/generate` answering a one-element list, or `/generate_stream` when `stream` is true."""
    body = await read_json(request)
    if not isinstance(body.get("stream", False), bool):
        raise ValidationError(f"`stream` must be a boolean, got {body['stream']!r}")
    if body.get("stream"):
        return await generate_stream(request, is_compat=True)
    response = await generate(request, is_compat=True)
    headers = {k: v for k, v in response.headers.items() if k.lower().startswith("x-")}
    return web.Response(body=b"[" + response.body + b"]", content_type="application/json", headers=headers)


async def health(request: web.Request) -> web.Response:
    router = get_router(request)
    try:
        await router.engine.shards.health()
    except Exception as error:  # any shard failure means unhealthy
        raise UnhealthyError() from error
    return web.Response()


async def tokenize(request: web.Request) -> web.Response:
    """Token ids of `inputs` with their text and UTF-8 byte offsets. Parameters are checked as for
    /generate (TGI does not check them) but otherwise ignored."""
    router = get_router(request)
    parsed = parse_generate_request(await read_json(request))
    validate_parameters(parsed.parameters, router.validation)
    validate_inputs(parsed, router.validation)
    return await tokenize_response(router, parsed.inputs, lambda tokens: tokens, add_special_tokens=True)


async def tokenize_response(router: Router, text: str, shape, add_special_tokens: bool) -> web.Response:
    """`shape(tokens_json(...))` as a JSON response. Counts against --max-concurrent-requests, and
    tokenizes and serializes off the event loop (a megabyte of text makes tens of megabytes of JSON);
    a text over the input token limit is a 422, as /generate answers it."""
    limit = router.validation.max_input_tokens

    def encode() -> bytes:
        try:
            ids, offsets = router.tokenizer.encode_with_offsets(text, add_special_tokens, max_tokens=limit)
        except TooManyTokensError as error:
            raise ValidationError(f"`inputs` must have less than {limit} tokens. Given: {error.num_tokens}") from None
        return json.dumps(shape(tokens_json(text, ids, offsets))).encode()

    with router.admit():
        body = await asyncio.to_thread(encode)
    return web.Response(body=body, content_type="application/json")


def tokens_json(text: str, ids: list[int], char_offsets: list[tuple[int, int]]) -> list[dict]:
    """TGI's token list: each token's text and its UTF-8 byte offsets into `text`."""
    byte_offsets = [0]
    for char in text:
        byte_offsets.append(byte_offsets[-1] + len(char.encode()))
    return [
        {"id": token_id, "text": text[start:stop], "start": byte_offsets[start], "stop": byte_offsets[stop]}
        for token_id, (start, stop) in zip(ids, char_offsets)
    ]


async def metrics(request: web.Request) -> web.Response:
    body = get_router(request).engine.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def info(request: web.Request) -> web.Response:
    router = get_router(request)  # the adapters change at run time: listed as they are now
    return web.json_response({**router.info, "lora_adapters": router.validation.lora.names})


async def _validate(router: Router, body: dict, is_compat: bool = False) -> ValidRequest:
    # `POST /` returns the prompt with the text by default, as TGI does for text-generation models.
    return await router.validate(parse_generate_request(body), default_return_full_text=is_compat)


async def collect(stream: RequestStream) -> list[TokenEvent]:
    """All events of a request; the request is cancelled if the caller goes away first."""
    try:
        return [event async for event in stream]
    finally:
        stream.cancel()


async def collect_all(streams: list[RequestStream]) -> list[list[TokenEvent]]:
    """The events of several requests; when one fails, the others are cancelled, not left running."""
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


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
                    "cached_tokens": stream.request.num_cached_prompt_tokens,
                }
        await sse.send(event_json(message))


def _generate_response(router: Router, valid: ValidRequest, stream: RequestStream, events: list[TokenEvent]) -> dict:
    response = {"generated_text": _full_text(valid, events[-1].generated_text)}
    if valid.details:
        details = _sequence_json(router, valid, stream, events)
        del details["generated_text"]
        response["details"] = details
    return response


def _sequence_json(router: Router, valid: ValidRequest, stream: RequestStream, events: list[TokenEvent]) -> dict:
    """TGI's BestOfSequence; `details` is the same without `generated_text`."""
    last = events[-1]
    sequence = {
        "generated_text": _full_text(valid, last.generated_text),
        "finish_reason": last.finish_reason.value,
        "generated_tokens": len(events),
        "seed": _seed(valid),
        "cached_tokens": stream.request.num_cached_prompt_tokens,
        "prefill": _prefill_json(router, valid, stream),
        "tokens": [_token_json(e.token) for e in events],
    }
    if valid.top_n_tokens:
        sequence["top_tokens"] = [[_token_json(t) for t in e.top_tokens] for e in events]
    return sequence


def _prefill_json(router: Router, valid: ValidRequest, stream: RequestStream) -> list[dict]:
    """The prompt tokens with their logprobs (the first has none), when decoder_input_details."""
    logprobs = stream.request.prompt_logprobs
    if not valid.decoder_input_details or logprobs is None:
        return []
    decode = router.tokenizer.decode
    return [
        {"id": token_id, "text": decode([token_id]), "logprob": finite(logprob)}
        for token_id, logprob in zip(valid.input_ids, logprobs)
    ]


def _mean_logprob(events: list[TokenEvent]) -> float:
    return sum(e.token.logprob for e in events) / len(events)


def with_seed(valid: ValidRequest, seed: int) -> ValidRequest:
    return dataclasses.replace(valid, sampling=dataclasses.replace(valid.sampling, seed=seed))


def _full_text(valid: ValidRequest, generated_text: str) -> str:
    return valid.inputs + generated_text if valid.return_full_text else generated_text


def _seed(valid: ValidRequest) -> int | None:
    return valid.sampling.seed if valid.sampling.do_sample else None


def _token_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": finite(token.logprob), "special": token.special}


def finite(value: float) -> float | None:
    """A number for JSON: NaN and infinities (not JSON) become null, as TGI's serde_json writes them."""
    return value if math.isfinite(value) else None
