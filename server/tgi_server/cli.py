"""`text-generation-server`: `prepare` resolves a model to local files; `serve` runs one shard.

A shard binds its Unix socket `{shard_uds_path}-{rank}` only after its model is loaded: the launcher reads
the socket's existence as readiness. A shard serving on TCP (`shard_listen_addr`, for a router on another
node) writes the HOST:PORT it serves on to `{shard_uds_path}-{rank}.address` instead, and refuses every
call without the shard secret.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import sys
import threading
from concurrent import futures

from tgi_proto.settings import DEFAULT_CUDA_GRAPH_SIZES, PrepareSettings, ShardSettings, parse_argv, split_host_port
from tgi_proto.tracing import shard_service_name, start_tracing, stop_tracing

log = logging.getLogger("tgi_server")

# TGI's short dtype names (ShardSettings.dtype) -> torch's.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Seconds a running call gets to finish after SIGTERM, before the shard exits regardless.
STOP_GRACE_SECONDS = 2.0
# gRPC worker threads: a step, and StepMasks, Health and Info answered beside it.
NUM_GRPC_WORKERS = 4
USAGE = "usage: tgi_server {prepare,serve} ... (`tgi_server serve --help` lists the flags of each)"


def prepare(settings: PrepareSettings) -> None:
    """Resolve the model to local files; prints one JSON line {model_path, tokenizer_path}. A model
    that cannot be prepared for a reason the user can fix ends with one line, `PrepareError: ...`."""
    from tgi_server.prepare import PrepareError, prepare as resolve, prepare_adapter

    try:
        if settings.adapter:
            answer = {"adapter_path": prepare_adapter(settings.model_id, settings.revision, settings.cache_dir)}
        else:
            prepared = resolve(settings.model_id, settings.revision, settings.cache_dir, settings.num_shard)
            answer = {"model_path": prepared.model_path, "tokenizer_path": prepared.tokenizer_path}
    except PrepareError as error:
        print(f"PrepareError: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(answer), flush=True)


def serve(settings: ShardSettings) -> None:
    """Load the model and serve the shard's gRPC API on a Unix socket, until SIGTERM or SIGINT."""
    # Progress bars (transformers' GGUF dequantizer draws one) become dozens of log lines through a pipe.
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard {settings.rank} %(levelname)s %(message)s")
    from tgi_server.lora import LoraAdapterError
    from tgi_server.models.registry import UnsupportedModelError
    from tgi_server.quantization import QuantizationConfigError
    from tgi_server.weights import WeightShapeError

    try:
        server = _build_server(settings)
    except (WeightShapeError, UnsupportedModelError, QuantizationConfigError, LoraAdapterError, KeyError,
            FileNotFoundError) as error:
        # A checkpoint that does not fit its config or this server: one line that names the tensor, file or format.
        log.error("cannot load %s: %s", settings.model_path, error.args[0] if isinstance(error, KeyError) else error)
        sys.exit(1)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    log.info("stopping")
    server.stop(grace=STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 1)
    # Exit without joining the gRPC worker threads: one may be blocked for good in a collective whose
    # peer is gone (NCCL never returns then), and the launcher wants this process gone either way.
    stop_tracing()
    logging.shutdown()
    os._exit(0)


def _build_server(settings: ShardSettings):
    import grpc
    import torch

    from tgi_proto.generate.v1 import generate_pb2 as pb
    from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
    from tgi_server.distributed import init_distributed
    from tgi_server.model_runner import ModelRunner
    from tgi_server.layers.linear import weight_quantization
    from tgi_server.models.registry import implementation, load_model, model_architecture
    from tgi_server.sampler import Watermark
    from tgi_server.service import TextGenerationService

    rank, world_size = settings.rank, settings.num_shard
    if torch.cuda.is_available():
        device = torch.device("cuda", settings.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if settings.dtype is not None:
        torch_dtype = getattr(torch, DTYPE_ALIASES.get(settings.dtype, settings.dtype))
    else:
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tp = init_distributed(
        rank, world_size, settings.master_addr, settings.master_port, device, torch_dtype,
        # peer memory is one host's; stages' groups take NCCL's
        custom_all_reduce=not settings.disable_custom_all_reduce and settings.nnodes == 1 and settings.pipeline_parallel_size == 1,
        num_stages=settings.pipeline_parallel_size,
    )
    backend = "portable" if settings.disable_custom_kernels else None
    model, config = load_model(settings.model_path, tp, torch_dtype, device, settings.load_format, backend,
                               settings.quantize)
    log.info("model %s runs on the %s implementation", model_architecture(config), implementation(model_architecture(config)))
    adapters = _load_adapters(model, settings)
    graph_sizes = DEFAULT_CUDA_GRAPH_SIZES if settings.cuda_graphs is None else settings.cuda_graphs
    graphs_wanted = device.type == "cuda" and bool(graph_sizes)
    if tp.stage is not None:
        log.info("pipeline parallel: this shard runs stage %d of %d, layers %d to %d%s", tp.stage.index,
                 tp.stage.num_stages, *tp.stage.layer_range(config.num_hidden_layers),
                 "; CUDA graphs are off with pipeline parallelism" if graphs_wanted else "")
        graph_sizes = ()
    elif not model.supports_cuda_graphs:
        if graphs_wanted:
            log.info("CUDA graphs are off: %s does not support them%s", type(model).__name__,
                     " on the portable kernels (--disable-custom-kernels)" if settings.disable_custom_kernels else "")
        graph_sizes = ()
    kv_cache_dtype = _kv_cache_dtype(settings.kv_cache_dtype) or torch_dtype
    watermark = Watermark(settings.watermark_gamma, settings.watermark_delta)
    drafter = None
    if settings.speculative_model is not None:
        drafter = _load_drafter(settings, config, tp, torch_dtype, device, backend, kv_cache_dtype, watermark)
    runner = ModelRunner(
        model, config, tp, device, torch_dtype, settings.block_size, graph_sizes,
        kv_cache_dtype=kv_cache_dtype, watermark=watermark, drafter=drafter,
    )
    info = pb.InfoResponse(
        architecture=model_architecture(config),
        dtype=str(torch_dtype).removeprefix("torch."),
        device_type=device.type,
        block_size=settings.block_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
        world_size=world_size,
        kv_cache_dtype=str(runner.kv_cache_dtype).removeprefix("torch."),
        model_implementation=implementation(model_architecture(config)),
        quantize=weight_quantization(model),
        speculative_model=model_architecture(drafter.config) if drafter is not None else "",
        lora_adapters=[spec.partition("=")[0] for spec in settings.lora_adapters],
        max_loras=adapters.num_slots if adapters is not None else 0,
    )
    interceptors = [secret_check(settings.shard_secret)] if settings.shard_secret else []
    server = grpc.server(device_thread_pool(device, NUM_GRPC_WORKERS), interceptors=interceptors)
    answers = rank == (tp.stage.sampling_rank if tp.stage is not None else 0)
    service = TextGenerationService(runner, info, rank, settings.cuda_memory_fraction, adapters, answers=answers)
    if settings.otlp_endpoint:
        service.tracer = start_tracing(settings.otlp_endpoint, shard_service_name(settings.otlp_service_name))
    pb_grpc.add_TextGenerationServiceServicer_to_server(service, server)
    address = _listen(server, settings)
    log.info("serving %s on %s (%s, %s, KV cache %s)", settings.model_path, address, device, torch_dtype,
             runner.kv_cache_dtype)
    return server


def _listen(server, settings: ShardSettings) -> str:
    """Binds the shard's Unix socket, or its TCP port (then writes HOST:PORT to its `.address` file, atomically,
    once serving); starts the server; returns where it serves."""
    socket_path = settings.socket_paths[settings.rank]
    if settings.shard_listen_addr is None:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
        return socket_path
    host, port = split_host_port(settings.shard_listen_addr, "shard_listen_addr")
    host = f"[{host}]" if ":" in host else host  # IPv6
    bound = server.add_insecure_port(f"{host}:{port + settings.local_rank if port else 0}")
    if not bound:
        raise OSError(f"cannot listen on {settings.shard_listen_addr} (port in use?)")
    server.start()
    address = f"{host}:{bound}"
    ready_path = settings.ready_paths[settings.rank]
    with open(ready_path + ".tmp", "w") as f:
        f.write(address)
    os.replace(ready_path + ".tmp", ready_path)
    return address


def secret_check(secret: str):
    """A gRPC server interceptor: calls without `authorization: Bearer <secret>` get UNAUTHENTICATED."""
    import grpc

    expected = f"Bearer {secret}".encode()

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing shard secret")

    refusal = grpc.unary_unary_rpc_method_handler(refuse)

    class SecretCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            given = dict(details.invocation_metadata).get("authorization", "")
            return continuation(details) if hmac.compare_digest(given.encode(), expected) else refusal

    return SecretCheck()


def _load_adapters(model, settings: ShardSettings):
    """The shard's LoRA adapter store (None: LoRA is off), holding the `name=directory` adapters of
    --lora-adapters under ids 1, 2, ... (in CPU memory; the router places them in GPU slots)."""
    from tgi_server.lora import AdapterStore, LoraAdapterError, read_adapter

    adapters = []
    for spec in settings.lora_adapters:
        name, separator, directory = spec.partition("=")
        if not separator or not name or not directory:
            raise LoraAdapterError(f"--lora-adapters entry {spec!r} is not `name=directory`")
        adapters.append(read_adapter(name, directory))
    if len({adapter.name for adapter in adapters}) < len(adapters):
        raise LoraAdapterError(f"--lora-adapters names an adapter twice: {[adapter.name for adapter in adapters]}")
    num_slots = settings.max_loras if settings.max_loras is not None else len(adapters)
    if not num_slots:
        if adapters:
            raise LoraAdapterError("--max-loras 0 turns LoRA off, but --lora-adapters names adapters")
        return None
    store = AdapterStore(model, num_slots, max_rank=max([settings.max_lora_rank, *(adapter.rank for adapter in adapters)]))
    for adapter_id, adapter in enumerate(adapters, 1):
        store.add(adapter_id, adapter)
        log.info("LoRA adapter %s (rank %d) read as adapter %d", adapter.name, adapter.rank, adapter_id)
    log.info("LoRA: %d GPU slot(s) of rank %d", num_slots, store.max_rank)
    return store


def _load_drafter(settings: ShardSettings, config, tp, dtype, device, backend, kv_cache_dtype, watermark):
    """The draft model of --speculative-model, on the model's devices and tensor-parallel group."""
    from tgi_server.drafter import Drafter
    from tgi_server.models.registry import UnsupportedModelError, load_model, model_architecture

    model, draft_config = load_model(settings.speculative_model, tp, dtype, device, settings.load_format, backend)
    if draft_config.vocab_size > config.vocab_size:
        raise UnsupportedModelError(
            f"the draft model {settings.speculative_model} has a vocabulary of {draft_config.vocab_size} tokens, more "
            f"than the model's {config.vocab_size}: it must share the model's tokenizer")
    log.info("draft model %s (%s) proposes tokens for speculative decoding", settings.speculative_model,
             model_architecture(draft_config))
    return Drafter(model, draft_config, device, settings.block_size, kv_cache_dtype, watermark)


def _kv_cache_dtype(name: str):
    """TGI's --kv-cache-dtype value as a torch dtype: None for "auto" (the model's), fp8_e4m3fn -> float8_e4m3fn."""
    import torch

    return None if name == "auto" else getattr(torch, "float8_" + name.removeprefix("fp8_"))


def device_thread_pool(device, max_workers: int) -> futures.ThreadPoolExecutor:
    """Threads for the gRPC server, each with `device` as its current CUDA device.

    CUDA's current device belongs to a thread, and every thread starts on GPU 0. The gRPC handlers
    run the model (Warmup captures CUDA graphs, Step launches kernels), so a pool thread left on
    GPU 0 would make every shard but the first capture and launch on the wrong GPU. Every thread
    that touches CUDA in a shard comes from here; `ModelRunner` refuses calls from any other.
    """
    import torch

    if device.type != "cuda":
        return futures.ThreadPoolExecutor(max_workers=max_workers)
    return futures.ThreadPoolExecutor(max_workers=max_workers, initializer=torch.cuda.set_device, initargs=(device,))


def main(argv: list[str] | None = None) -> None:
    """`python -m tgi_server prepare|serve ...`: the flags of each command come from its settings type."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"prepare": (PrepareSettings, prepare), "serve": (ShardSettings, serve)}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    settings_type, command = commands[argv[0]]
    command(parse_argv(settings_type, argv[1:], prog=f"tgi_server {argv[0]}"))
