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
from typing import Optional

import typer

app = typer.Typer(add_completion=False, help="Shard process of the text-generation server.")
log = logging.getLogger("tgi_server")

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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
    block_size: int = typer.Option(16, help="Tokens per KV cache block."),
):
    """Load the model and serve the shard's gRPC API on a Unix socket."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard {rank} %(levelname)s %(message)s")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    server = _build_server(model_path, rank, world_size, uds_path, master_addr, master_port, dtype, block_size)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    log.info("stopping")
    server.stop(grace=2).wait()


def _build_server(model_path, rank, world_size, uds_path, master_addr, master_port, dtype, block_size):
    import grpc
    import torch

    from tgi_proto.generate.v1 import generate_pb2 as pb
    from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
    from tgi_server.distributed import init_distributed
    from tgi_server.model_runner import ModelRunner
    from tgi_server.models.registry import load_model, model_architecture
    from tgi_server.service import TextGenerationService

    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tp = init_distributed(rank, world_size, master_addr, master_port, device)
    model, config = load_model(model_path, tp, torch_dtype, device)
    runner = ModelRunner(model, config, tp, device, torch_dtype, block_size)
    info = pb.InfoResponse(
        architecture=model_architecture(config),
        dtype=str(torch_dtype).removeprefix("torch."),
        device_type=device.type,
        block_size=block_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
        world_size=world_size,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(runner, info, rank), server)
    socket_path = f"{uds_path}-{rank}"
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    log.info("serving %s on %s (%s, %s)", model_path, socket_path, device, torch_dtype)
    return server


def main() -> None:
    app()
