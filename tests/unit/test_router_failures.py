"""The router under failure, with fake shards (no model, no gRPC): clients that go away, steps that
fail, shard calls that fail while other ranks hang, and the drain that SIGTERM starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tokenizer_fixtures import byte_level_dir  # noqa: F401 (fixture)

from tgi_router.app import Router, build_app
from tgi_router.block_manager import BlockManager
from tgi_router.engine import Engine, GenerationInput
from tgi_router.errors import GenerationError
from tgi_router.metrics import Metrics
from tgi_router.request import Sample, SampledToken, StepResult
from tgi_router.scheduler import Scheduler, SchedulerConfig
from tgi_router.shard_client import ShardClient, ShardError
from tgi_router.tokenizer import Tokenizer
from tgi_router.validation import ValidationConfig

TOKEN_ID = 100
BLOCK_SIZE = 4


class FakeShards:
    """Samples TOKEN_ID for every sequence a step completes, one step per `step_seconds`; raises
    `failure` on step number `fail_at_step`."""

    def __init__(self, step_seconds: float = 0.0, failure: Exception | None = None, fail_at_step: int = 0,
                 logprob: float = -0.5):
        self.step_seconds = step_seconds
        self.logprob = logprob
        self.failure = failure
        self.fail_at_step = fail_at_step
        self.num_steps = 0

    async def step(self, plan) -> StepResult:
        self.num_steps += 1
        await asyncio.sleep(self.step_seconds)
        if self.failure is not None and self.num_steps == self.fail_at_step:
            raise self.failure
        done = [c.request for c in plan.scheduled if c.request.num_computed_tokens + c.num_tokens == c.request.num_tokens]
        return StepResult([Sample(request.id, (SampledToken(TOKEN_ID, self.logprob),)) for request in done])

    async def health(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(byte_level_dir):  # noqa: F811
    return Tokenizer.from_dir(byte_level_dir)


def make_engine(tokenizer, shards, num_blocks: int = 64, max_batch_size: int = 8) -> Engine:
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64, max_batch_size=max_batch_size), blocks)
    return Engine(scheduler, shards, tokenizer, Metrics(32, 64, blocks.capacity_tokens))


@contextlib.asynccontextmanager
async def running(engine: Engine):
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def request(num_tokens: int) -> GenerationInput:
    return GenerationInput(input_ids=[1, 2, 3, 4, 5], max_new_tokens=num_tokens, ignore_eos=True)


def all_blocks_free(engine: Engine) -> bool:
    blocks = engine.scheduler.blocks
    return blocks.num_free_blocks == blocks.num_usable_blocks


async def outcome(stream) -> int | GenerationError:
    try:
        return len([event async for event in stream])
    except GenerationError as error:
        return error


@pytest.mark.parametrize("failure", [ShardError("Step failed on shard 1: Socket closed"), KeyError(7)])
async def test_failed_step_fails_every_request_in_flight_and_the_loop_goes_on(tokenizer, failure):
    engine = make_engine(tokenizer, FakeShards(failure=failure, fail_at_step=3))
    async with running(engine):
        streams = [engine.submit(request(20)) for _ in range(3)]
        outcomes = await asyncio.wait_for(asyncio.gather(*(outcome(s) for s in streams)), 5)
        assert all(isinstance(o, GenerationError) and o.status == 424 for o in outcomes), outcomes
        assert all_blocks_free(engine) and not engine.scheduler.has_work
        assert await asyncio.wait_for(outcome(engine.submit(request(4))), 5) == 4
    assert engine.metrics.step_failure.labels("decode")._value.get() == 1


async def test_cancel_frees_the_blocks_before_the_next_step(tokenizer):
    engine = make_engine(tokenizer, FakeShards(step_seconds=0.01))
    async with running(engine):
        stream = engine.submit(request(200))
        async for _ in stream:
            if engine.num_steps == 5:
                break
        stream.cancel()
        assert all_blocks_free(engine) and not engine.scheduler.has_work
        assert engine.metrics.batch_max_tokens._value.get() == 0


class Rank:
    """A fake gRPC stub: answers, fails at once, or hangs like a rank stuck in a collective."""

    def __init__(self, behaviour: str, delay: float = 0.0):
        self.behaviour = behaviour
        self.delay = delay
        self.was_cancelled = False

    async def Step(self, request, metadata=()):
        await asyncio.sleep(self.delay)
        if self.behaviour == "fail":
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="Socket closed")
        if self.behaviour == "raise":  # a rank whose collective lost its peer
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, details="Connection closed by peer")
        try:
            await asyncio.sleep(3600 if self.behaviour == "hang" else 0)
        except asyncio.CancelledError:
            self.was_cancelled = True
            raise
        return "ok"


async def test_a_failed_shard_call_fails_at_once_and_cancels_the_ranks_still_waiting():
    client = ShardClient.__new__(ShardClient)
    client._stubs, client._metadata = [Rank("hang"), Rank("fail"), Rank("answer")], ()
    with pytest.raises(ShardError, match="Step failed on shard 1: Socket closed"):
        await asyncio.wait_for(client._all("Step", None), 2)
    assert client._stubs[0].was_cancelled


async def test_a_dead_shard_is_named_rather_than_the_rank_whose_collective_failed_first():
    # The survivor's error may reach the router before the dead shard's (a loaded machine).
    client = ShardClient.__new__(ShardClient)
    client._stubs, client._metadata = [Rank("raise", delay=0.01), Rank("fail", delay=0.2)], ()
    with pytest.raises(ShardError, match="Step failed on shard 1: Socket closed"):
        await asyncio.wait_for(client._all("Step", None), 2)


# ---------------------------------------------------------------- through HTTP


@contextlib.asynccontextmanager
async def serving(tokenizer, shards, **router_args):
    engine = make_engine(tokenizer, shards, max_batch_size=router_args.pop("max_batch_size", 8))
    validation = ValidationConfig(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=32,
                                  max_total_tokens=256)
    router = Router(engine=engine, tokenizer=tokenizer, validation=validation,
                    info={"model_id": "fake", "version": "0", "max_client_batch_size": 4},
                    **{"max_concurrent_requests": 8, **router_args})
    async with TestClient(TestServer(build_app(router), handler_cancellation=True)) as client:
        yield router, client


def generate_body(num_tokens: int) -> dict:
    return {"inputs": "Hello world", "parameters": {"max_new_tokens": num_tokens, "ignore_eos": True}}


async def wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_client_disconnecting_mid_stream_frees_its_blocks_within_one_step(tokenizer):
    async with serving(tokenizer, FakeShards(step_seconds=0.02)) as (router, client):
        engine = router.engine
        response = await client.post("/generate_stream", json=generate_body(200))
        for _ in range(3):
            await response.content.readline()
        assert not all_blocks_free(engine)
        response.close()  # the client goes away mid-stream
        steps_at_disconnect = engine.num_steps
        await wait_for(lambda: all_blocks_free(engine))
        assert engine.num_steps - steps_at_disconnect <= 1
        assert not engine.scheduler.has_work and router.num_in_flight == 0


async def test_client_disconnecting_while_queued_leaves_the_queue(tokenizer):
    async with serving(tokenizer, FakeShards(step_seconds=0.01), max_batch_size=1) as (router, client):
        engine = router.engine
        running = asyncio.create_task(client.post("/generate", json=generate_body(60)))
        await wait_for(lambda: engine.scheduler.running)
        queued = asyncio.create_task(client.post("/generate", json=generate_body(60)))
        await wait_for(lambda: engine.scheduler.waiting)
        queued.cancel()  # closes its connection while it waits for a slot in the batch
        await wait_for(lambda: not engine.scheduler.waiting)
        response = await running
        assert response.status == 200 and response.headers["x-generated-tokens"] == "60"
        assert all_blocks_free(engine) and router.num_in_flight == 0


async def test_drain_finishes_in_flight_requests_and_refuses_new_ones_with_503(tokenizer):
    async with serving(tokenizer, FakeShards(step_seconds=0.01)) as (router, client):
        stream = asyncio.create_task(client.post("/generate_stream", json=generate_body(40)))
        await wait_for(lambda: router.num_in_flight == 1)
        drain = asyncio.create_task(router.drain(timeout=10))
        await wait_for(lambda: router.is_draining)
        refused = await client.post("/generate", json=generate_body(2))
        assert refused.status == 503
        assert await refused.json() == {"error": "Server is shutting down", "error_type": "shutting_down"}
        assert (await client.get("/health")).status == 503
        events = [json.loads(line[5:]) for line in (await (await stream).text()).splitlines() if line.startswith("data:")]
        assert len(events) == 40 and events[-1]["details"] is None and events[-1]["generated_text"] is not None
        await asyncio.wait_for(drain, 1)


async def test_drain_fails_requests_still_running_after_its_timeout(tokenizer):
    async with serving(tokenizer, FakeShards(step_seconds=0.01)) as (router, client):
        stream = asyncio.create_task(client.post("/generate_stream", json=generate_body(250)))
        generate = asyncio.create_task(client.post("/generate", json=generate_body(250)))
        await wait_for(lambda: router.num_in_flight == 2)
        await asyncio.wait_for(router.drain(timeout=0.2), 3)
        last_event = json.loads((await (await stream).text()).strip().splitlines()[-1][5:])
        assert last_event == {"error": "Server is shutting down", "error_type": "shutting_down"}
        assert (await generate).status == 503
        assert all_blocks_free(router.engine)


def strict_json(text: str):
    def reject(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=reject)


async def test_non_finite_logprobs_are_sent_as_null_never_as_invalid_json(tokenizer):
    async with serving(tokenizer, FakeShards(logprob=float("-inf"))) as (router, client):
        stream = await (await client.post("/generate_stream", json=generate_body(3))).text()
        body = {**generate_body(3), "parameters": {**generate_body(3)["parameters"], "details": True}}
        generated = strict_json(await (await client.post("/generate", json=body)).text())
    events = [strict_json(line[5:]) for line in stream.splitlines() if line.startswith("data:")]
    assert [event["token"]["logprob"] for event in events] == [None] * 3
    assert [token["logprob"] for token in generated["details"]["tokens"]] == [None] * 3


class BrokenTokenizer:
    """A tokenizer with a bug: every encode raises what no handler expects."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, *args, **kwargs):
        raise ZeroDivisionError("a bug in the tokenizer")


async def test_an_unexpected_error_is_a_logged_500_in_tgis_error_json_without_the_body(tokenizer, caplog):
    async with serving(tokenizer, FakeShards(step_seconds=0.01)) as (router, client):
        router.tokenizer = BrokenTokenizer(tokenizer)
        secret = "my private prompt"
        with caplog.at_level("ERROR", logger="tgi_router"):
            response = await client.post("/generate", json={"inputs": secret, "parameters": {"max_new_tokens": 3}})
            payload = await response.json()
        health = await client.get("/health")
    assert response.status == 500
    assert payload == {"error": "Internal server error", "error_type": "internal"}
    assert "unexpected error in POST /generate" in caplog.text and "ZeroDivisionError" in caplog.text
    assert secret not in caplog.text
    assert router.engine.metrics.request_failure.labels("internal")._value.get() == 1
    assert health.status == 200  # the server carries on



@pytest.fixture(scope="module")
def chat_tokenizer(byte_level_dir, tmp_path_factory):  # noqa: F811
    """The byte-level tokenizer with a chat template, for the chat route."""
    import shutil

    root = tmp_path_factory.mktemp("chat_tokenizer")
    shutil.copytree(byte_level_dir, root, dirs_exist_ok=True)
    (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    return Tokenizer.from_dir(root)


STREAMING_BODIES = {
    "/generate_stream": generate_body(200),
    "/v1/completions": {"prompt": "Hello world", "max_tokens": 200, "stream": True, "ignore_eos": True},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "stream": True,
                             "ignore_eos": True},
}


@pytest.mark.parametrize("path", list(STREAMING_BODIES))
async def test_a_stream_whose_client_left_before_the_headers_leaves_nothing_running(chat_tokenizer, path, caplog,
                                                                                    monkeypatch):
    """The client is gone when the response headers are written (the transport is closing): the
    request is dropped at once, and nothing is logged or counted as an internal error."""
    import aiohttp_sse

    async def closing_transport(self, request):
        raise ConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(aiohttp_sse.EventSourceResponse, "prepare", closing_transport)
    async with serving(chat_tokenizer, FakeShards(step_seconds=0.005)) as (router, client):
        with caplog.at_level("DEBUG", logger="tgi_router"):
            response = await client.post(path, json=STREAMING_BODIES[path])
            await wait_for(lambda: not router.engine.scheduler.has_work and router.num_in_flight == 0, timeout=1.0)
        metrics = router.engine.metrics
        internal = metrics.request_failure.labels("internal")._value.get()
        dropped = metrics.request_failure.labels("dropped")._value.get()
    assert response.status == 499  # nobody reads it
    # /generate_stream writes its headers before it submits; the OpenAI routes submit first, then drop.
    assert internal == 0 and dropped == (0 if path == "/generate_stream" else 1)
    assert "unexpected error" not in caplog.text and "client disconnected" in caplog.text


async def raw_request(client, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return response


async def test_an_authorization_header_that_is_not_utf8_is_a_401(tokenizer):
    async with serving(tokenizer, FakeShards(), api_key="k3y") as (_, client):
        body = json.dumps(generate_body(2)).encode()
        response = await raw_request(client, b"POST /generate HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert response.startswith(b"HTTP/1.1 401")


async def test_docs_assets_serve_the_bundle_and_404_any_other_name(tokenizer):
    async with serving(tokenizer, FakeShards()) as (_, client):
        css = await client.get("/docs/assets/swagger-ui.css")
        long_name = await client.get("/docs/assets/" + "a" * 300 + ".js")
        missing = await client.get("/docs/assets/nothing.js")
    assert css.status == 200 and "css" in css.headers["Content-Type"]
    assert long_name.status == 404 and missing.status == 404


async def test_a_malformed_request_logs_one_warning_without_the_clients_bytes(tokenizer, caplog):
    async with serving(tokenizer, FakeShards()) as (_, client):
        with caplog.at_level("DEBUG"):
            response = await raw_request(client, b"GET /health HTTP/1.1\r\nHost: t\r\nBad\x01Header: SECRETBYTES\r\n\r\n")
    assert response.startswith(b"HTTP/1.0 400") or response.startswith(b"HTTP/1.1 400")
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [(r.levelname, r.getMessage()) for r in records] == [("WARNING", "malformed HTTP request: BadHttpMessage")]
    assert "SECRETBYTES" not in caplog.text and "Traceback" not in caplog.text



@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_never_arrives_gets_a_408(tokenizer, framing):
    async with serving(tokenizer, FakeShards(), body_timeout=0.5) as (router, client):
        head = b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: 100\r\n\r\n{\"inputs\"" if framing == "content-length" else \
            b"Transfer-Encoding: chunked\r\n\r\n9\r\n{\"inputs\"\r\n"
        started = time.monotonic()
        response = await raw_request(client, head)  # and nothing more
        elapsed = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in response
    assert elapsed < 3 and router.num_in_flight == 0


async def test_expect_100_continue_is_answered_after_the_key_and_size_checks(tokenizer):
    async with serving(tokenizer, FakeShards(), api_key="k3y", payload_limit=1000) as (_, client):
        body = json.dumps(generate_body(2)).encode()

        def head(key: str, length: int) -> bytes:
            return (f"POST /generate HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n").encode()

        wrong_key = await raw_request(client, head("nope", len(body)))
        too_large = await raw_request(client, head("k3y", 5000))
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(head("k3y", len(body)))
        go_ahead = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(body)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    assert wrong_key.startswith(b"HTTP/1.1 401")
    assert too_large.startswith(b"HTTP/1.1 413") and b"Payload too large" in too_large
    assert go_ahead == b"HTTP/1.1 100 Continue\r\n\r\n" and answer.startswith(b"HTTP/1.1 200")
