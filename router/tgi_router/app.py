"""The aiohttp application: shared state, error handling, and the routes of every API module."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
from dataclasses import dataclass

import aiohttp_cors
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tgi_proto.settings import DEFAULT_DRAIN_TIMEOUT_SECONDS
from tgi_router.engine import Engine, GenerationInput, RequestStream
from tgi_router.metrics import Metrics
from tgi_router.errors import InferError, OverloadedError, ShuttingDownError, ValidationError
from tgi_router.grammar import Grammars
from tgi_router.tokenizer import Tokenizer
from tgi_router.tracing import record_request, tracing_middleware
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

# A request body that has not fully arrived after this long gets 408.
BODY_TIMEOUT_SECONDS = 30.0
# The status of a response nobody reads: its client disconnected (nginx's 499).
CLIENT_CLOSED_REQUEST = 499
# Served while draining, so the drain can be watched; everything else answers 503.
_SERVED_WHILE_DRAINING = frozenset({"/metrics"})


@dataclass
class Router:
    """Everything a handler needs, built once by the CLI after warmup."""

    engine: Engine
    tokenizer: Tokenizer
    validation: ValidationConfig
    info: dict
    max_concurrent_requests: int
    # The `x-compute-type` header: "gpu+optimized" on GPUs (TGI's value), else "cpu".
    compute_type: str = "cpu"
    # When set, POST routes (except /chat_tokenize) need `Authorization: Bearer <api_key>`.
    api_key: str | None = None
    cors_allow_origins: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    # Routes a platform chooses (Vertex AI's AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE).
    predict_route: str | None = None
    health_route: str | None = None
    # Seconds a client has to send its whole request body (408 after).
    body_timeout: float = BODY_TIMEOUT_SECONDS
    # SIGTERM: how long in-flight requests may take to finish (the launcher's --graceful-termination-timeout).
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_SECONDS
    # Compiles request grammars and makes their matchers (None: no grammar can be served).
    grammars: Grammars | None = None
    # An OpenTelemetry tracer (--otlp-endpoint): requests and steps get spans (`tracing`); None: off.
    tracer: object | None = None
    num_in_flight: int = 0
    # Set on SIGTERM: new requests get 503 while the in-flight ones finish.
    is_draining: bool = False

    @contextlib.contextmanager
    def admit(self):
        """Holds one of `max_concurrent_requests` slots; raises OverloadedError when none is free."""
        if self.is_draining:
            raise ShuttingDownError()
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
        # The tokenizer lets go of the GIL while it works, so a thread keeps the event loop responsive.
        input_ids = await asyncio.to_thread(self.tokenizer.encode, request.inputs, add_special_tokens)
        valid = validate_input_ids(request, input_ids, self.validation, default_return_full_text)
        if valid.grammar is not None:  # compiled (or found in the cache) before the request is queued
            await self.grammars.prepare_async(valid.grammar)
        return valid

    async def drain(self, timeout: float = DEFAULT_DRAIN_TIMEOUT_SECONDS) -> None:
        """Refuses new requests (503) and waits until the in-flight ones are done; those still running
        after `timeout` seconds fail with a 503 (an error JSON, or an error event in a stream)."""
        self.is_draining = True
        log.info("shutting down: draining %d in-flight request(s)", self.num_in_flight)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            log.warning("%d request(s) still running after %.0f s; failing them", self.num_in_flight, timeout)
            self.engine.fail_all(ShuttingDownError())
            while self.num_in_flight and loop.time() < deadline + 1.0:
                await asyncio.sleep(0.05)

    def submit(self, valid: ValidRequest) -> RequestStream:
        return self.engine.submit(
            GenerationInput(
                input_ids=valid.input_ids,
                max_new_tokens=valid.max_new_tokens,
                sampling=valid.sampling,
                stop_sequences=tuple(valid.stop),
                top_n_tokens=valid.top_n_tokens,
                ignore_eos=valid.ignore_eos,
                prompt_logprobs=valid.decoder_input_details,
                constraint=None if valid.grammar is None else self.grammars.matcher(valid.grammar),
                adapter_id=valid.adapter_id,
            )
        )


def timing_headers(router: Router, valid: ValidRequest, stream: RequestStream, started_at: float,
                   validated_at: float) -> dict[str, str]:
    """Records a finished request in the metrics; returns TGI's response headers for it (durations
    in ms, `x-compute-time` in s)."""
    now = time.monotonic()
    request = stream.request
    scheduled_at = request.first_scheduled_time or now
    num_generated = len(request.output_token_ids)
    inference = now - scheduled_at
    _observe_request(router.engine.metrics, valid, started_at, validated_at, scheduled_at, now, num_generated)
    if router.tracer is not None:
        record_request(router.tracer, started_at, validated_at, request.arrival_time, scheduled_at, request.first_token_time,
                       now, {"input_tokens": len(valid.input_ids), "generated_tokens": num_generated,
                             "max_new_tokens": valid.max_new_tokens})
    return {
        "x-compute-type": router.compute_type,
        "x-compute-time": f"{now - started_at:.6f}",
        "x-compute-characters": str(len(valid.inputs)),
        "x-total-time": str(round((now - started_at) * 1000)),
        "x-validation-time": str(round((validated_at - started_at) * 1000)),
        "x-queue-time": str(round((scheduled_at - request.arrival_time) * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round(inference * 1000 / max(num_generated, 1))),
        "x-prompt-tokens": str(len(valid.input_ids)),
        "x-generated-tokens": str(num_generated),
    }


def _observe_request(metrics: Metrics, valid: ValidRequest, started_at: float, validated_at: float,
                     scheduled_at: float, now: float, num_generated: int) -> None:
    metrics.request_success.inc()
    metrics.request_duration.observe(now - started_at)
    metrics.validation_duration.observe(validated_at - started_at)
    metrics.queue_duration.observe(scheduled_at - validated_at)
    metrics.inference_duration.observe(now - scheduled_at)
    metrics.time_per_token.observe((now - scheduled_at) / max(num_generated, 1))
    metrics.generated_tokens.observe(num_generated)
    metrics.input_length.observe(len(valid.input_ids))
    metrics.max_new_tokens.observe(valid.max_new_tokens)


def stream_headers(router: Router, num_characters: int) -> dict[str, str]:
    """Headers of an SSE response, sent before any token exists."""
    return {"x-compute-type": router.compute_type, "x-compute-characters": str(num_characters),
            "X-Accel-Buffering": "no"}


def error_response(error: InferError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """401 with an empty body unless the bearer key matches (compared in constant time)."""
    if not _is_authorized(request):
        return web.Response(status=401)
    return await handler(request)


def _is_authorized(request: web.Request) -> bool:
    key = request.app[ROUTER_KEY].api_key
    if not key or request.method != "POST" or request.path == "/chat_tokenize":
        return True
    # Header bytes that are not UTF-8 arrive as surrogates: they must compare unequal, not raise.
    supplied = request.headers.get("Authorization", "").lower().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(supplied, f"bearer {key}".lower().encode())


def add_post(app: web.Application, path: str, handler) -> None:
    """A POST route whose `Expect: 100-continue` is answered only after the checks that need no body."""
    app.router.add_post(path, handler, expect_handler=_expect_continue)


async def _expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The client waits for a go-ahead before it sends its body: refuse first what needs no body, a
    wrong API key (401) or a declared size over --payload-limit (413); else say 100 Continue."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return web.Response(status=417)
    if not _is_authorized(request):
        return web.Response(status=401)
    limit = request.app[ROUTER_KEY].payload_limit
    if request.content_length is not None and request.content_length > limit:
        return error_response(InferError(f"Payload too large: the body is over {limit} bytes", 413, "validation"))
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


# TGI's `err` label of tgi_request_failure for each error type.
_FAILURE_LABELS = {"validation": "validation", "overloaded": "overloaded", "generation": "generation",
                   "template_error": "template", "incomplete_generation": "incomplete"}


def count_failure(router: Router, error: InferError) -> None:
    router.engine.metrics.request_failure.labels(_FAILURE_LABELS.get(error.error_type, error.error_type)).inc()


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Counts generation requests and turns every error into TGI's error JSON: InferErrors with their
    status, anything unexpected as a 500 (logged with its traceback, never with the request body)."""
    router = request.app[ROUTER_KEY]
    if request.method == "POST":
        router.engine.metrics.request_count.inc()
    try:
        if router.is_draining and request.path not in _SERVED_WHILE_DRAINING:
            raise ShuttingDownError()
        return await handler(request)
    except InferError as error:
        count_failure(router, error)
        return error_response(error)
    except web.HTTPException:
        raise
    except ConnectionResetError:  # the client went away: nothing to answer, nothing failed here
        log.debug("client disconnected during %s %s", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        error = InferError("Internal server error", 500, "internal")
        count_failure(router, error)
        return error_response(error)


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object; anything else is a 4xx in TGI's error format.

    Strict JSON, as TGI's parser reads it: UTF-8 only, no NaN or Infinity, no lone surrogate escapes
    (they cannot be tokenized or sent back), integers of at most 4300 digits, bounded nesting.
    """
    if request.content_type != "application/json":
        raise InferError("Expected request with `Content-Type: application/json`", 415, "validation")
    timeout = request.app[ROUTER_KEY].body_timeout
    try:
        async with asyncio.timeout(timeout):  # a body that never ends must not hold a connection forever
            raw = await request.read()
    except TimeoutError:
        raise InferError(f"Request body not received within {timeout:g} s", 408, "validation") from None
    except web.HTTPRequestEntityTooLarge as error:
        raise InferError(f"Payload too large: {error.text}", 413, "validation") from error
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # raises on lone surrogates
    except (ValueError, RecursionError) as error:  # JSONDecodeError, Unicode errors, too many digits
        raise InferError(f"Failed to parse the request body as JSON: {error}", 400, "validation") from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class MalformedRequestLogFilter(logging.Filter):
    """aiohttp logs a request it cannot parse as an ERROR with a traceback quoting the client's bytes:
    anyone could flood the log so. This turns it into one WARNING line naming the error type only."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args, record.exc_info, record.exc_text = "malformed HTTP request: %s", (type(error).__name__,), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def build_app(router: Router) -> web.Application:
    from tgi_router.http import cloud, lora, openai, openapi, playground, tgi

    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestLogFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLogFilter())
    middlewares = [auth_middleware, errors_middleware] + ([tracing_middleware] if router.tracer is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=router.payload_limit)
    app[ROUTER_KEY] = router
    tgi.add_routes(app)
    openai.add_routes(app)
    lora.add_routes(app)
    cloud.add_routes(app)
    openapi.add_routes(app)
    playground.add_routes(app)
    if router.predict_route:
        add_post(app, router.predict_route, cloud.vertex)
    if router.health_route:
        app.router.add_get(router.health_route, tgi.health)
    _allow_cors(app, router.cors_allow_origins)

    async def run_engine(app: web.Application):
        task = asyncio.create_task(router.engine.run())
        _drain_on_sigterm(router)
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(run_engine)
    return app


def _drain_on_sigterm(router: Router) -> None:
    """SIGTERM drains the in-flight requests, then stops the server (replacing aiohttp's handler, which
    stops listening at once and then waits up to 60 s for every open request)."""
    loop = asyncio.get_running_loop()
    tasks = []  # holds the drain task, which the loop only references weakly

    async def drain_then_exit():
        await router.drain(router.drain_timeout)
        loop.call_soon(_raise_graceful_exit)

    def on_sigterm():
        if not router.is_draining:
            tasks.append(loop.create_task(drain_then_exit()))

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)


def _raise_graceful_exit() -> None:
    raise web.GracefulExit()


def _allow_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """CORS as TGI allows it: GET and POST, the content-type header, from the listed origins (any
    origin when none is listed)."""
    options = aiohttp_cors.ResourceOptions(allow_headers=("content-type",), allow_methods=("GET", "POST"))
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins or ("*",)})
    for route in list(app.router.routes()):
        cors.add(route)


def get_router(request: web.Request) -> Router:
    return request.app[ROUTER_KEY]
