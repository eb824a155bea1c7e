"""`text-generation-router`: connect to the shards, warm them up, derive the limits, serve HTTP."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.settings import RouterSettings, parse_argv
from tgi_proto.tracing import start_tracing
from tgi_router.adapters import LoraAdapters
from tgi_router.app import Router, build_app
from tgi_router.block_manager import BlockManager
from tgi_router.engine import Engine
from tgi_router.grammar import Grammars
from tgi_router.metrics import Metrics
from tgi_router.replicas import Replicas
from tgi_router.scheduler import Scheduler, SchedulerConfig
from tgi_router.shard_client import ShardClient, ShardError
from tgi_router.tokenizer import Tokenizer
from tgi_router.validation import ValidationConfig

log = logging.getLogger("tgi_router")

VERSION = "0.1.0"
DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096
# On CPU a 4,096-token step (what warmup runs first) takes minutes; 512 keeps the start near 20 s.
DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU = 512
# Tokens a draft model proposes per step when --speculate is not given.
DEFAULT_MODEL_DRAFTS = 3


def serve(settings: RouterSettings) -> None:
    """Serve the HTTP API in front of running shards."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    # handler_cancellation: a client that disconnects cancels its handler, which frees its request.
    try:
        web.run_app(
            _start(settings), host=settings.hostname, port=settings.port, print=None, access_log=None,
            handler_cancellation=True,
        )
    except ShardError as error:  # before serving: shards unreachable, or refusing this router (its secret)
        log.error("cannot start: %s", error)
        sys.exit(1)


async def _start(settings: RouterSettings) -> web.Application:
    # Tokenization runs in asyncio's default executor (asyncio.to_thread).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(settings.validation_workers, thread_name_prefix="validation")
    )
    if settings.is_waiting_tuned:
        log.warning("Model supports prefill chunking. `waiting_served_ratio` and `max_waiting_tokens` will be ignored.")
    tokenizer = Tokenizer.from_dir(settings.tokenizer_path)
    groups = [ShardClient(targets, settings.shard_secret, settings.answering_rank) for targets in settings.shard_targets]
    shard_info = await groups[0].info()
    await asyncio.gather(*(shards.clear_cache() for shards in groups))
    limits = await _warmup(settings, groups, shard_info, tokenizer)
    adapters = LoraAdapters(tuple(shard_info.lora_adapters), shard_info.max_loras)
    config = SchedulerConfig(limits.max_batch_prefill_tokens, limits.max_batch_size, settings.prefix_caching,
                             speculate=_speculate(settings, shard_info), draft_model=bool(shard_info.speculative_model))
    schedulers = [Scheduler(config, BlockManager(limits.num_blocks, shard_info.block_size),
                            adapters if replica == 0 else adapters.for_replica()) for replica in range(len(groups))]
    blocks = schedulers[0].blocks
    validation = ValidationConfig(
        max_best_of=settings.max_best_of,
        max_stop_sequences=settings.max_stop_sequences,
        max_top_n_tokens=settings.max_top_n_tokens,
        max_input_tokens=limits.max_input_tokens,
        max_total_tokens=limits.max_total_tokens,
        grammar_support=not settings.disable_grammar_support,
        vocab_size=shard_info.vocab_size,
        lora=adapters,
    )
    grammars = Grammars(tokenizer.backend.to_str(), shard_info.vocab_size, sorted(tokenizer.eos_token_ids))
    if not settings.disable_grammar_support:
        grammars.preload()
    metrics = Metrics(limits.max_input_tokens, limits.max_total_tokens, blocks.capacity_tokens * len(groups))
    engines = [Engine(scheduler, shards, tokenizer, metrics, replica)
               for replica, (scheduler, shards) in enumerate(zip(schedulers, groups))]
    tracer = None
    if settings.otlp_endpoint:
        tracer = start_tracing(settings.otlp_endpoint, settings.otlp_service_name)
        log.info("exporting traces to %s as %s", settings.otlp_endpoint, settings.otlp_service_name)
    for engine in engines:
        engine.tracer = tracer
    engine = engines[0] if len(engines) == 1 else Replicas(engines)
    router = Router(
        engine=engine,
        tokenizer=tokenizer,
        validation=validation,
        info=_info(settings, limits, shard_info, blocks.capacity_tokens * len(groups)),
        max_concurrent_requests=settings.max_concurrent_requests,
        compute_type="gpu+optimized" if shard_info.device_type == "cuda" else "cpu",
        api_key=settings.api_key,
        cors_allow_origins=tuple(settings.cors_allow_origin),
        payload_limit=settings.payload_limit,
        predict_route=settings.aip_predict_route,
        health_route=settings.aip_health_route,
        drain_timeout=settings.drain_timeout,
        grammars=grammars,
        tracer=tracer,
    )
    log.info("KV cache: %s blocks of %s tokens; %s", limits.num_blocks, shard_info.block_size, limits)
    url = client_url(settings.hostname, settings.port)
    log.info("serving on http://%s:%d: open %s/ in a browser for the chat playground; TGI clients take %s, "
             "OpenAI clients %s/v1", settings.hostname, settings.port, url, url, url)
    return build_app(router)


def client_url(hostname: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on hostname:port (all interfaces:
    localhost)."""
    if hostname in ("", "0.0.0.0", "::", "[::]"):
        hostname = "localhost"
    elif ":" in hostname and not hostname.startswith("["):
        hostname = f"[{hostname}]"  # an IPv6 address
    return f"http://{hostname}:{port}"


@dataclass(frozen=True)
class Limits:
    num_blocks: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int


async def _warmup(settings: RouterSettings, groups: list[ShardClient], shard_info: pb.InfoResponse,
                  tokenizer: Tokenizer) -> Limits:
    """Runs Warmup on every replica's shards and derives the unset limits the way TGI does (every replica
    gets the KV cache the smallest one fits)."""
    max_position = shard_info.max_position_embeddings or 1 << 20
    max_total = settings.max_total_tokens or min(max_position, tokenizer.model_max_length or max_position)
    default_prefill = DEFAULT_MAX_BATCH_PREFILL_TOKENS if shard_info.device_type == "cuda" else DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU
    prefill = settings.max_batch_prefill_tokens or min(default_prefill, max_position)
    batch_size = settings.max_batch_size or settings.max_concurrent_requests
    log.info("warming up: a step of %d prompt tokens, then sizing the KV cache%s", prefill,
             " and capturing CUDA graphs" if shard_info.device_type == "cuda" else "")
    started = time.monotonic()
    request = pb.WarmupRequest(
        max_batch_prefill_tokens=prefill,
        max_total_tokens=max_total,
        max_batch_size=batch_size,
        max_batch_total_tokens=settings.max_batch_total_tokens or 0,
    )
    warmed = min(await asyncio.gather(*(shards.warmup(request) for shards in groups)), key=lambda w: w.num_blocks)
    log.info("warmup took %.1f s", time.monotonic() - started)
    capacity = (warmed.num_blocks - 1) * warmed.block_size
    if settings.max_total_tokens is None:
        max_total = min(max_total, capacity)
    elif settings.max_total_tokens > capacity:
        raise SystemExit(f"Not enough memory to handle `max_total_tokens={settings.max_total_tokens}` (KV cache holds {capacity} tokens)")
    max_input = settings.max_input_tokens or max_total - 1
    if max_input >= max_total:
        raise SystemExit(f"`max_input_tokens` ({max_input}) must be < `max_total_tokens` ({max_total})")
    return Limits(warmed.num_blocks, max_input, max_total, prefill, batch_size)


def _info(settings: RouterSettings, limits: Limits, shard_info: pb.InfoResponse, kv_capacity_tokens: int) -> dict:
    """TGI's /info fields, and (as TGI 1.x had them, plus the cache's element type) what the shards run."""
    return {
        "model_id": settings.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": settings.max_concurrent_requests,
        "max_best_of": settings.max_best_of,
        "max_stop_sequences": settings.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "validation_workers": settings.validation_workers,
        "max_client_batch_size": settings.max_client_batch_size,
        "router": "text-generation-router",
        "version": VERSION,
        "sha": None,
        "docker_label": settings.docker_label,
        "model_dtype": shard_info.dtype,
        "model_device_type": shard_info.device_type,
        "kv_cache_dtype": shard_info.kv_cache_dtype,
        "model_implementation": shard_info.model_implementation,
        "max_batch_total_tokens": kv_capacity_tokens,
        "num_shard": shard_info.world_size,
        "data_parallel_size": settings.data_parallel_size,
        "prefix_caching": settings.prefix_caching,
        "speculate": _speculate(settings, shard_info) or None,
        "speculative_model": shard_info.speculative_model or None,
        "max_loras": shard_info.max_loras,
        "quantize": shard_info.quantize or None,
    }


def _speculate(settings: RouterSettings, shard_info: pb.InfoResponse) -> int:
    """Tokens proposed per step: --speculate, by default DEFAULT_MODEL_DRAFTS with a draft model."""
    return settings.speculate or (DEFAULT_MODEL_DRAFTS if shard_info.speculative_model else 0)


def main(argv: list[str] | None = None) -> None:
    """`python -m tgi_router ...`: the flags are RouterSettings' fields."""
    serve(parse_argv(RouterSettings, argv, prog="tgi_router"))
