"""`text-generation-server`: `prepare` resolves a model to local files; `serve` runs one shard.

A shard binds its Unix socket `{uds_path}-{rank}` only after its model is loaded: the launcher reads
the socket's existence as readiness.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Optional

import typer

app = typer.Typer(add_completion=False, help="Shard process of the text-generation server.")
log = logging.getLogger("tgi_server")

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# TGI's --kv-cache-dtype values -> torch dtype names ("auto": the model's dtype).
KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
# Seconds a running call gets to finish after SIGTERM, before the shard exits regardless.
STOP_GRACE_SECONDS = 2.0
# gRPC worker threads: a step, and Health/Info answered beside it.
NUM_GRPC_WORKERS = 4


@app.command()
def prepare(
    model_id: str,
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    cache_dir: Optional[str] = typer.Option(None, envvar="HUGGINGFACE_HUB_CACHE", help="Hub cache directory."),
):
    """Resolve MODEL_ID to local files; prints one JSON line {model_path, tokenizer_path}."""
    from tgi_server.prepare import prepare as resolve

    prepared = resolve(model_id, revision, cache_dir)
    print(json.dumps({"model_path": prepared.model_path, "tokenizer_path": prepared.tokenizer_path}), flush=True)


@app.command()
def serve(
    model_path: str,
    rank: int = typer.Option(0, help="This shard's rank in the tensor-parallel group."),
    world_size: int = typer.Option(1, help="Number of shards."),
    uds_path: str = typer.Option("/tmp/text-generation-server", help="Socket path prefix; binds {uds_path}-{rank}."),
    master_addr: str = typer.Option("localhost", help="torch.distributed rendezvous address."),
    master_port: int = typer.Option(29500, help="torch.distributed rendezvous port."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 (default: bfloat16 on GPU, float32 on CPU)."),
    kv_cache_dtype: str = typer.Option("auto", help="auto (the model's dtype), fp8_e4m3fn or fp8_e5m2: half the bytes per cached token, values stored unscaled."),
    block_size: int = typer.Option(16, help="Tokens per KV cache block."),
    load_format: str = typer.Option("auto", help="auto: read the checkpoint; dummy: random weights from config.json alone."),
    cuda_graphs: Optional[str] = typer.Option(
        None, help="Decode batch sizes to capture as CUDA graphs, comma-separated; 0 disables (default: 1, 2, 4, 8, 16, 24, 32, 48, 64, 80, ... 256 up to the max batch size; cuda_graphs.DEFAULT_BATCH_SIZES)."
    ),
    cuda_memory_fraction: float = typer.Option(1.0, help="Share of the GPU's memory this shard may use."),
    disable_custom_kernels: bool = typer.Option(False, help="Use the portable PyTorch attention and layers, not the Triton kernels."),
    disable_custom_all_reduce: bool = typer.Option(
        False, help="Every all-reduce through NCCL (default: small ones through GPU peer-to-peer memory where the GPUs allow it)."
    ),
):
    """Load the model and serve the shard's gRPC API on a Unix socket."""
    # Progress bars (transformers' GGUF dequantizer draws one) become dozens of log lines through a pipe.
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard {rank} %(levelname)s %(message)s")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise typer.BadParameter(f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if not 0 < cuda_memory_fraction <= 1:
        raise typer.BadParameter(f"--cuda-memory-fraction must be in (0, 1], got {cuda_memory_fraction}")
    options = ShardOptions(
        dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size, load_format=load_format, cuda_graph_sizes=_graph_sizes(cuda_graphs),
        cuda_memory_fraction=cuda_memory_fraction, disable_custom_kernels=disable_custom_kernels,
        disable_custom_all_reduce=disable_custom_all_reduce,
    )
    from tgi_server.models.registry import UnsupportedModelError
    from tgi_server.weights import WeightShapeError

    try:
        server = _build_server(model_path, rank, world_size, uds_path, master_addr, master_port, options)
    except (WeightShapeError, UnsupportedModelError, KeyError, FileNotFoundError) as error:
        # A checkpoint that does not fit its config: one line that names the tensor or file.
        log.error("cannot load %s: %s", model_path, error.args[0] if isinstance(error, KeyError) else error)
        raise typer.Exit(1)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    log.info("stopping")
    server.stop(grace=STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 1)
    # Exit without joining the gRPC worker threads: one may be blocked for good in a collective whose
    # peer is gone (NCCL never returns then), and the launcher wants this process gone either way.
    logging.shutdown()
    os._exit(0)


@dataclass(frozen=True)
class ShardOptions:
    dtype: str | None
    kv_cache_dtype: str  # a KV_CACHE_DTYPES key
    block_size: int
    load_format: str
    cuda_graph_sizes: tuple[int, ...]
    cuda_memory_fraction: float
    disable_custom_kernels: bool
    disable_custom_all_reduce: bool = False


def _graph_sizes(text: str | None) -> tuple[int, ...]:
    from tgi_server.cuda_graphs import DEFAULT_BATCH_SIZES

    if text is None:
        return DEFAULT_BATCH_SIZES
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"--cuda-graphs takes comma-separated batch sizes, got {text!r}")
    if any(size < 0 for size in sizes):
        raise typer.BadParameter(f"--cuda-graphs sizes must be >= 0, got {text!r}")
    return tuple(size for size in sizes if size > 0)


def _build_server(model_path, rank, world_size, uds_path, master_addr, master_port, options: ShardOptions):
    import grpc
    import torch

    from tgi_proto.generate.v1 import generate_pb2 as pb
    from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
    from tgi_server.distributed import init_distributed
    from tgi_server.kernels import disable_kernels
    from tgi_server.model_runner import ModelRunner
    from tgi_server.models.registry import load_model, model_architecture
    from tgi_server.service import TextGenerationService

    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = options.dtype
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    disable_kernels(options.disable_custom_kernels)
    tp = init_distributed(
        rank, world_size, master_addr, master_port, device, torch_dtype, custom_all_reduce=not options.disable_custom_all_reduce
    )
    model, config = load_model(model_path, tp, torch_dtype, device, options.load_format)
    kv_dtype_name = KV_CACHE_DTYPES[options.kv_cache_dtype]
    runner = ModelRunner(
        model, config, tp, device, torch_dtype, options.block_size, options.cuda_graph_sizes,
        kv_cache_dtype=getattr(torch, kv_dtype_name) if kv_dtype_name else None,
    )
    info = pb.InfoResponse(
        architecture=model_architecture(config),
        dtype=str(torch_dtype).removeprefix("torch."),
        device_type=device.type,
        block_size=options.block_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
        world_size=world_size,
        kv_cache_dtype=str(runner.kv_cache_dtype).removeprefix("torch."),
    )
    server = grpc.server(device_thread_pool(device, NUM_GRPC_WORKERS))
    pb_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(runner, info, rank, options.cuda_memory_fraction), server)
    socket_path = f"{uds_path}-{rank}"
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    log.info("serving %s on %s (%s, %s, KV cache %s)", model_path, socket_path, device, torch_dtype, runner.kv_cache_dtype)
    return server


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


def main() -> None:
    app()
