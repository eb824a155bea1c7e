"""`text-generation-router`: connect to the shards, warm them up, derive the limits, serve HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import typer
from aiohttp import web

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_router.app import DRAIN_TIMEOUT_SECONDS, Router, build_app
from tgi_router.block_manager import BlockManager
from tgi_router.engine import Engine
from tgi_router.metrics import Metrics
from tgi_router.scheduler import Scheduler, SchedulerConfig
from tgi_router.shard_client import ShardClient
from tgi_router.tokenizer import Tokenizer
from tgi_router.validation import ValidationConfig

log = logging.getLogger("tgi_router")
app = typer.Typer(add_completion=False, help="HTTP router of the text-generation server.")

VERSION = "0.1.0"
DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096
# On CPU a 4,096-token step (what warmup runs first) takes minutes; 512 keeps the start near 20 s.
DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU = 512
# TGI's launcher defaults; both are ignored (chunked prefill is always on), as TGI v3 ignores them.
DEFAULT_WAITING_SERVED_RATIO = 0.3
DEFAULT_MAX_WAITING_TOKENS = 20


@dataclass(frozen=True)
class RouterArgs:
    model_id: str
    tokenizer_path: str
    shard_uds_path: str
    num_shard: int
    hostname: str
    port: int
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: Optional[int]
    max_total_tokens: Optional[int]
    max_batch_prefill_tokens: Optional[int]
    max_batch_total_tokens: Optional[int]
    max_batch_size: Optional[int]
    max_client_batch_size: int
    validation_workers: int
    waiting_served_ratio: float
    max_waiting_tokens: int
    api_key: Optional[str]
    cors_allow_origin: list[str]
    payload_limit: int
    predict_route: Optional[str]
    health_route: Optional[str]
    drain_timeout: float = DRAIN_TIMEOUT_SECONDS


@app.command()
def serve(
    tokenizer_path: str = typer.Option(..., help="Directory with tokenizer.json (from `text-generation-server prepare`)."),
    model_id: str = typer.Option("", help="Model id reported by /info."),
    shard_uds_path: str = typer.Option("/tmp/text-generation-server", help="Shard sockets are {path}-{rank}."),
    num_shard: int = typer.Option(1, help="Number of shards."),
    hostname: str = typer.Option("0.0.0.0"),
    port: int = typer.Option(3000),
    max_concurrent_requests: int = typer.Option(128),
    max_best_of: int = typer.Option(2),
    max_stop_sequences: int = typer.Option(4),
    max_top_n_tokens: int = typer.Option(5),
    max_input_tokens: Optional[int] = typer.Option(None),
    max_total_tokens: Optional[int] = typer.Option(None),
    max_batch_prefill_tokens: Optional[int] = typer.Option(None),
    max_batch_total_tokens: Optional[int] = typer.Option(None),
    max_batch_size: Optional[int] = typer.Option(None),
    max_client_batch_size: int = typer.Option(4, help="Most prompts in one /v1/completions request."),
    validation_workers: int = typer.Option(2, min=1, help="Threads that tokenize requests."),
    waiting_served_ratio: float = typer.Option(
        DEFAULT_WAITING_SERVED_RATIO, help="Ignored, as by TGI v3 with chunked prefill (always on here): waiting requests join every step."
    ),
    max_waiting_tokens: int = typer.Option(DEFAULT_MAX_WAITING_TOKENS, help="Ignored, like --waiting-served-ratio."),
    api_key: Optional[str] = typer.Option(None, envvar="API_KEY", help="Bearer key required on generation routes."),
    cors_allow_origin: list[str] = typer.Option([], help="Origins allowed by CORS (`*` for any)."),
    payload_limit: int = typer.Option(2_000_000, help="Largest request body in bytes."),
    predict_route: Optional[str] = typer.Option(None, help="Extra route answering like /vertex (Vertex AI)."),
    health_route: Optional[str] = typer.Option(None, help="Extra route answering like /health (Vertex AI)."),
    drain_timeout: float = typer.Option(
        DRAIN_TIMEOUT_SECONDS, min=0, help="Seconds in-flight requests get to finish after SIGTERM; later ones get 503."
    ),
):
    """Serve the HTTP API in front of running shards."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    args = RouterArgs(**{k: v for k, v in locals().items()})
    # handler_cancellation: a client that disconnects cancels its handler, which frees its request.
    web.run_app(
        _start(args), host=args.hostname, port=args.port, print=None, access_log=None, handler_cancellation=True
    )


async def _start(args: RouterArgs) -> web.Application:
    # Tokenization runs in asyncio's default executor (asyncio.to_thread).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(args.validation_workers, thread_name_prefix="validation")
    )
    if (args.waiting_served_ratio, args.max_waiting_tokens) != (DEFAULT_WAITING_SERVED_RATIO, DEFAULT_MAX_WAITING_TOKENS):
        log.warning("Model supports prefill chunking. `waiting_served_ratio` and `max_waiting_tokens` will be ignored.")
    tokenizer = Tokenizer.from_dir(args.tokenizer_path)
    shards = ShardClient(args.shard_uds_path, args.num_shard)
    shard_info = await shards.info()
    await shards.clear_cache()
    limits = await _warmup(args, shards, shard_info, tokenizer)
    blocks = BlockManager(limits.num_blocks, shard_info.block_size)
    scheduler = Scheduler(SchedulerConfig(limits.max_batch_prefill_tokens, limits.max_batch_size), blocks)
    validation = ValidationConfig(
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        max_input_tokens=limits.max_input_tokens,
        max_total_tokens=limits.max_total_tokens,
    )
    router = Router(
        engine=Engine(scheduler, shards, tokenizer, Metrics(
            limits.max_input_tokens, limits.max_total_tokens, blocks.capacity_tokens)),
        tokenizer=tokenizer,
        validation=validation,
        info=_info(args, limits, shard_info, blocks.capacity_tokens),
        max_concurrent_requests=args.max_concurrent_requests,
        compute_type="gpu+optimized" if shard_info.device_type == "cuda" else "cpu",
        api_key=args.api_key,
        cors_allow_origins=tuple(args.cors_allow_origin),
        payload_limit=args.payload_limit,
        predict_route=args.predict_route,
        health_route=args.health_route,
        drain_timeout=args.drain_timeout,
    )
    log.info("KV cache: %s blocks of %s tokens; %s", limits.num_blocks, shard_info.block_size, limits)
    log.info("serving on http://%s:%d", args.hostname, args.port)
    return build_app(router)


@dataclass(frozen=True)
class Limits:
    num_blocks: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int


async def _warmup(args: RouterArgs, shards: ShardClient, shard_info: pb.InfoResponse, tokenizer: Tokenizer) -> Limits:
    """Runs Warmup on the shards and derives the unset limits the way TGI does."""
    max_position = shard_info.max_position_embeddings or 1 << 20
    max_total = args.max_total_tokens or min(max_position, tokenizer.model_max_length or max_position)
    default_prefill = DEFAULT_MAX_BATCH_PREFILL_TOKENS if shard_info.device_type == "cuda" else DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU
    prefill = args.max_batch_prefill_tokens or min(default_prefill, max_position)
    batch_size = args.max_batch_size or args.max_concurrent_requests
    log.info("warming up: a step of %d prompt tokens, then sizing the KV cache%s", prefill,
             " and capturing CUDA graphs" if shard_info.device_type == "cuda" else "")
    started = time.monotonic()
    warmed = await shards.warmup(
        pb.WarmupRequest(
            max_batch_prefill_tokens=prefill,
            max_total_tokens=max_total,
            max_batch_size=batch_size,
            max_batch_total_tokens=args.max_batch_total_tokens or 0,
        )
    )
    log.info("warmup took %.1f s", time.monotonic() - started)
    capacity = (warmed.num_blocks - 1) * warmed.block_size
    if args.max_total_tokens is None:
        max_total = min(max_total, capacity)
    elif args.max_total_tokens > capacity:
        raise SystemExit(f"Not enough memory to handle `max_total_tokens={args.max_total_tokens}` (KV cache holds {capacity} tokens)")
    max_input = args.max_input_tokens or max_total - 1
    if max_input >= max_total:
        raise SystemExit(f"`max_input_tokens` ({max_input}) must be < `max_total_tokens` ({max_total})")
    return Limits(warmed.num_blocks, max_input, max_total, prefill, batch_size)


def _info(args: RouterArgs, limits: Limits, shard_info: pb.InfoResponse, kv_capacity_tokens: int) -> dict:
    """TGI's /info fields, and (as TGI 1.x had them, plus the cache's element type) what the shards run."""
    return {
        "model_id": args.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_best_of": args.max_best_of,
        "max_stop_sequences": args.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "validation_workers": args.validation_workers,
        "max_client_batch_size": args.max_client_batch_size,
        "router": "text-generation-router",
        "version": VERSION,
        "sha": None,
        "docker_label": None,
        "model_dtype": shard_info.dtype,
        "model_device_type": shard_info.device_type,
        "kv_cache_dtype": shard_info.kv_cache_dtype,
        "max_batch_total_tokens": kv_capacity_tokens,
        "num_shard": shard_info.world_size,
    }


def main() -> None:
    app()
