"""The router's spans (with --otlp-endpoint; see tgi_proto.tracing): one trace per HTTP request, and
one span per step, the shards' step spans under it.

A request's span (named by its route, e.g. `POST /generate`) is the child of the client's W3C
`traceparent` when one came, and has a child per phase: `validation`, `queue` (waiting for the
batch), `prefill` (to the first token) and `decode` (the rest), each with its token counts. They are
written when the request ends, from the times the router keeps anyway (nothing runs per token).
A step's span (`step`) carries the batch's shape; its context goes to the shards in the Step call's
gRPC metadata, and each shard's own `step` span hangs under it.
"""

from __future__ import annotations

import contextvars
import time

from aiohttp import web

from tgi_proto.tracing import extract, inject

# The incoming request's (trace context, span name), set by the middleware for the handler's task.
_incoming: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar("incoming_trace", default=None)


@web.middleware
async def tracing_middleware(request: web.Request, handler):
    _incoming.set((extract(request.headers), f"{request.method} {request.path}"))
    return await handler(request)


def record_request(tracer, started_at: float, validated_at: float, queued_at: float, scheduled_at: float,
                   first_token_at: float | None, now: float, attributes: dict) -> None:
    """The spans of a request that ended `now` (monotonic times), under the client's trace if any."""
    incoming = _incoming.get()
    if incoming is None:
        return
    parent, name = incoming
    to_ns = time.time_ns() - time.monotonic_ns()  # monotonic -> epoch nanoseconds
    ns = lambda t: int(t * 1e9) + to_ns  # noqa: E731
    root = tracer.start_span(name, context=parent, start_time=ns(started_at), attributes=attributes)
    first_token_at = first_token_at if first_token_at is not None else now
    from opentelemetry import trace

    inside = trace.set_span_in_context(root)
    phases = [("validation", started_at, validated_at, {}),
              ("queue", queued_at, scheduled_at, {}),
              ("prefill", scheduled_at, first_token_at, {"input_tokens": attributes["input_tokens"]}),
              ("decode", first_token_at, now, {"generated_tokens": attributes["generated_tokens"]})]
    for phase, start, end, phase_attributes in phases:
        tracer.start_span(phase, context=inside, start_time=ns(start), attributes=phase_attributes).end(end_time=ns(max(end, start)))
    root.end(end_time=ns(now))


def start_step(tracer, step_id: int, method: str, batch_size: int, num_tokens: int):
    """(the step's span, the gRPC metadata that makes it the shards' steps' parent)."""
    from opentelemetry import trace

    span = tracer.start_span("step", attributes={"step_id": step_id, "method": method, "batch_size": batch_size,
                                                 "batch_tokens": num_tokens})
    return span, inject(trace.set_span_in_context(span))
