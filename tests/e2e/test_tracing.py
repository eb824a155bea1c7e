"""--otlp-endpoint: the router and the shard export OpenTelemetry spans over OTLP/gRPC, to a real OTLP
trace receiver served here (opentelemetry-proto's gRPC service). A request's span continues the
client's W3C `traceparent` and has its phases as children; the shard's step spans hang under the
router's through the gRPC metadata."""

from __future__ import annotations

import time
from concurrent import futures

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from server_helpers import running_server, save_tiny_model, tiny_config

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = []  # (service name, span)

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(attributes["service.name"], span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collected, f"http://127.0.0.1:{port}"
    server.stop(0)


def attributes(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


async def test_a_requests_spans_continue_the_clients_trace_and_the_shards_steps_hang_under_the_routers(
    receiver, tmp_path, hf_home, smollm2_tokenizer_dir
):
    collected, endpoint = receiver
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / "llama")
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    with running_server(str(model), hf_home, "--otlp-endpoint", endpoint, "--otlp-service-name", "tgi.router",
                        env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/generate", json=body, headers=headers) as response:
                assert response.status == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(span.name == "POST /generate" for _, span in collected.spans):
            time.sleep(0.1)
        time.sleep(0.5)  # the shard's batch, too
    spans = {(service, span.name): span for service, span in collected.spans if span.trace_id.hex() == TRACE_ID}
    root = spans["tgi.router", "POST /generate"]
    assert root.parent_span_id.hex() == PARENT_ID
    assert attributes(root)["generated_tokens"] == attributes(root)["max_new_tokens"] == 5
    assert attributes(root)["input_tokens"] == attributes(spans["tgi.router", "prefill"])["input_tokens"] > 0
    phases = [name for name in ("validation", "queue", "prefill", "decode") if ("tgi.router", name) in spans]
    assert phases == ["validation", "queue", "prefill", "decode"]
    for name in phases:
        phase = spans["tgi.router", name]
        assert phase.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= phase.start_time_unix_nano <= phase.end_time_unix_nano <= root.end_time_unix_nano
    assert attributes(spans["tgi.router", "decode"]) == {"generated_tokens": 5}
    # steps: the router's, each with the shard's under it in the same trace
    router_steps = {span.span_id: span for service, span in collected.spans if (service, span.name) == ("tgi.router", "step")}
    shard_steps = [span for service, span in collected.spans if (service, span.name) == ("tgi.server", "step")]
    assert len(router_steps) >= 5 and len(shard_steps) >= 5
    for span in shard_steps:
        parent = router_steps[span.parent_span_id]
        assert span.trace_id == parent.trace_id and attributes(span)["step_id"] == attributes(parent)["step_id"]
