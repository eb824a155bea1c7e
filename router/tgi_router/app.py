"""The aiohttp application: shared state, error handling, and the routes of every API module."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

from aiohttp import web

from tgi_router.engine import Engine, GenerationInput, RequestStream
from tgi_router.errors import InferError, OverloadedError, ValidationError
from tgi_router.tokenizer import Tokenizer
from tgi_router.validation import (
    GenerateRequest,
    ValidationConfig,
    ValidRequest,
    validate_input_ids,
    validate_inputs,
    validate_parameters,
)

log = logging.getLogger(__name__)

ROUTER_KEY = web.AppKey("router", object)


@dataclass
class Router:
    """Everything a handler needs, built once by the CLI after warmup."""

    engine: Engine
    tokenizer: Tokenizer
    validation: ValidationConfig
    info: dict
    max_concurrent_requests: int
    num_in_flight: int = 0

    @contextlib.contextmanager
    def admit(self):
        """Holds one of `max_concurrent_requests` slots; raises OverloadedError when none is free."""
        if self.num_in_flight >= self.max_concurrent_requests:
            raise OverloadedError()
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1

    async def validate(
        self,
        request: GenerateRequest,
        is_stream: bool = False,
        default_return_full_text: bool = False,
        add_special_tokens: bool = True,
    ) -> ValidRequest:
        """TGI's checks, in its order: parameters, inputs, then lengths after tokenization."""
        validate_parameters(request.parameters, self.validation, is_stream=is_stream)
        validate_inputs(request, self.validation)
        # HF tokenizers release the GIL, so a thread keeps the event loop responsive.
        input_ids = await asyncio.to_thread(self.tokenizer.encode, request.inputs, add_special_tokens)
        return validate_input_ids(request, input_ids, self.validation, default_return_full_text)

    def submit(self, valid: ValidRequest) -> RequestStream:
        return self.engine.submit(
            GenerationInput(
                input_ids=valid.input_ids,
                max_new_tokens=valid.max_new_tokens,
                sampling=valid.sampling,
                stop_sequences=tuple(valid.stop),
                top_n_tokens=valid.top_n_tokens,
            )
        )


def error_response(error: InferError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except InferError as error:
        return error_response(error)


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object; anything else is a 4xx in TGI's error format."""
    if request.content_type != "application/json":
        raise InferError("Expected request with `Content-Type: application/json`", 415, "validation")
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InferError(f"Failed to parse the request body as JSON: {error}", 400, "validation")
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


def build_app(router: Router) -> web.Application:
    from tgi_router.http import openai, tgi

    app = web.Application(middlewares=[errors_middleware])
    app[ROUTER_KEY] = router
    tgi.add_routes(app)
    openai.add_routes(app)

    async def run_engine(app: web.Application):
        task = asyncio.create_task(router.engine.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(run_engine)
    return app


def get_router(request: web.Request) -> Router:
    return request.app[ROUTER_KEY]
