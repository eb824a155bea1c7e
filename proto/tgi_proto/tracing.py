"""OpenTelemetry tracing for the router and the shards (--otlp-endpoint), exported over OTLP/gRPC.

Off unless an endpoint is given: then nothing here is imported by the hot paths and no span exists.
On, each process exports its spans in batches to the collector under its service name (the router's
--otlp-service-name; shards under the same name ending in `.server`, TGI's pair). A trace context
crosses from router to shard in the gRPC call's metadata as a W3C `traceparent`, the way it arrives
from HTTP clients.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable, Mapping

def shard_service_name(router_service_name: str) -> str:
    """The shards' service name beside the router's: `x.router` -> `x.server`, else `x.server`."""
    return router_service_name.removesuffix(".router") + ".server"


def start_tracing(endpoint: str, service_name: str):
    """A tracer whose spans go, in batches, to the OTLP/gRPC collector at `endpoint` (e.g.
    http://collector:4317; plain text unless https://). Flushed when the process exits."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _providers.append(provider)
    atexit.register(stop_tracing)
    return provider.get_tracer("tgi")


def stop_tracing() -> None:
    """Exports the spans still batched (a process ending with os._exit calls this first)."""
    while _providers:
        _providers.pop().shutdown()


_providers: list = []


def inject(context=None) -> list[tuple[str, str]]:
    """gRPC metadata carrying the current (or the given) span's context as `traceparent`."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return list(carrier.items())


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]]):
    """The trace context in HTTP headers (a mapping, e.g. aiohttp's case-blind one) or gRPC metadata
    (pairs) as a W3C `traceparent`, for a span's parent."""
    from opentelemetry import propagate

    return propagate.extract(carrier if isinstance(carrier, Mapping) else dict(carrier))
