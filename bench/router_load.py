"""How much of a core the router spends per step when it streams to many clients: the cost that
must stay under a decode step's GPU time, or the GPU waits for the router (at 128 concurrent streams
on an H200, a decode step is ~8 ms).

The real router process (`python -m tgi_router`), with the model's real tokenizer, serves
`--concurrency` streaming `/generate_stream` (or `--endpoint chat`) clients (this process, aiohttp) in front of a stand-in
shard (a thread here, gRPC on a Unix socket) that answers every step at once, or after `--step-ms`,
with a token drawn from the ids of whole English words for each request the step completes. Over
`--seconds`, reports the steps run, the router process's CPU time (user + system, from /proc) per
step and per streamed token, and the step rate the router sustained. No model runs: this measures
the router alone (HTTP, validation, tokenizing, scheduling, gRPC, detokenizing, SSE). The router runs
on one core (`--router-cpu`), everything else here on the others, so the clients do not slow it.

    python bench/router_load.py [--tokenizer-dir bench/assets/llama-3.1-tokenizer] [--concurrency 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import aiohttp
import grpc

from bench_common import WORDS, environment
from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.generate.v1 import generate_pb2_grpc as pb_grpc
from tokenizers import Tokenizer

BLOCK_SIZE = 16


class StandInShard(pb_grpc.TextGenerationServiceServicer):
    """Answers the router's calls as a one-shard model would, computing nothing."""

    def __init__(self, vocab_size: int, token_ids: list[int], step_seconds: float):
        self.vocab_size = vocab_size
        self.token_ids = token_ids
        self.step_seconds = step_seconds
        self.rng = random.Random(0)
        self.known: dict[int, int] = {}  # tokens known (prompt + sampled) by request id
        self.computed: dict[int, int] = {}
        self.num_steps = 0

    def Info(self, request, context):
        return pb.InfoResponse(architecture="LlamaForCausalLM", dtype="bfloat16", device_type="cuda",
                               block_size=BLOCK_SIZE, vocab_size=self.vocab_size, max_position_embeddings=8192,
                               world_size=1, kv_cache_dtype="bfloat16", model_implementation="stand-in")

    def Health(self, request, context):
        return pb.HealthResponse()

    def ClearCache(self, request, context):
        return pb.ClearCacheResponse()

    def Warmup(self, request, context):
        return pb.WarmupResponse(num_blocks=65536, block_size=BLOCK_SIZE)

    def Step(self, request, context):
        self.num_steps += 1
        for request_id in request.finished_ids:
            self.known.pop(request_id, None)
            self.computed.pop(request_id, None)
        for new in request.new_requests:
            self.known[new.id], self.computed[new.id] = len(new.token_ids), new.num_cached_tokens
        samples = []
        for item in request.scheduled:
            self.computed[item.id] += item.num_tokens
            if self.computed[item.id] == self.known[item.id]:
                self.known[item.id] += 1
                token = pb.SampledToken(token_id=self.rng.choice(self.token_ids), logprob=-0.5)
                samples.append(pb.Sample(request_id=item.id, tokens=[token]))
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return pb.StepResponse(samples=samples, forward_ns=int(self.step_seconds * 1e9))


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def metric(session, url: str, prefix: str) -> float:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


async def client(session, url: str, endpoint: str, prompt: str, output_len: int, stop: asyncio.Event,
                 counts: list[int]) -> None:
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "stream": True,
                                              "max_tokens": output_len, "ignore_eos": True}
    else:
        path, body = "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": output_len, "ignore_eos": True}}
    while not stop.is_set():
        async with session.post(url + path, json=body) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data:"):
                    counts[0] += 1


async def load(url: str, router_pid: int, endpoint: str, prompts: list[str], output_len: int, warmup: float,
               seconds: float) -> dict:
    stop, counts = asyncio.Event(), [0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.create_task(client(session, url, endpoint, prompt, output_len, stop, counts)) for prompt in prompts]
        await asyncio.sleep(warmup)
        steps0, cpu0, tokens0, start = await metric(session, url, "tgi_batch_inference_count_total"), \
            process_cpu_seconds(router_pid), counts[0], time.perf_counter()
        await asyncio.sleep(seconds)
        steps1, cpu1, tokens1, end = await metric(session, url, "tgi_batch_inference_count_total"), \
            process_cpu_seconds(router_pid), counts[0], time.perf_counter()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    steps, tokens = steps1 - steps0, tokens1 - tokens0
    return {
        "steps": int(steps), "streamed_tokens": tokens, "wall_s": round(end - start, 2),
        "router_cpu_s": round(cpu1 - cpu0, 2),
        "router_cpu_ms_per_step": round((cpu1 - cpu0) / steps * 1e3, 3),
        "router_cpu_us_per_token": round((cpu1 - cpu0) / tokens * 1e6, 2),
        "steps_per_s": round(steps / (end - start), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", default=str(Path(__file__).parent / "assets" / "llama-3.1-tokenizer"))
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--endpoint", choices=["generate", "chat"], default="generate",
                        help="generate: /generate_stream; chat: /v1/chat/completions with stream")
    parser.add_argument("--input-len", type=int, default=128, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=0.0, help="the stand-in shard's time per step")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--router-cpu", type=int, default=0,
                        help="the core the router runs on (the clients and the stand-in shard get the others; -1: no pinning)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    router_cpus = {args.router_cpu} if args.router_cpu >= 0 and len(cpus) > 1 else set(cpus)
    if args.router_cpu >= 0 and len(cpus) > 1:
        os.sched_setaffinity(0, set(cpus) - router_cpus)
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer_dir) / "tokenizer.json"))
    word_ids = sorted({ids[0] for word in WORDS if len(ids := tokenizer.encode(" " + word, add_special_tokens=False).ids) == 1})
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.input_len)) for _ in range(args.concurrency)]
    shard = StandInShard(tokenizer.get_vocab_size(with_added_tokens=True), word_ids, args.step_ms / 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        uds = f"{tmp}/shard"
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
        server.add_insecure_port(f"unix:{uds}-0")
        server.start()
        port = 20000 + os.getpid() % 20000
        router = subprocess.Popen(
            [sys.executable, "-m", "tgi_router", "--tokenizer-path", args.tokenizer_dir, "--model-id", args.tokenizer_dir,
             "--shard-uds-path", uds, "--port", str(port), "--max-concurrent-requests", str(4 * args.concurrency),
             "--max-total-tokens", "4096", "--max-input-tokens", "2048", "--max-batch-size", str(args.concurrency)],
            stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/router.log", "w"),
            preexec_fn=lambda: os.sched_setaffinity(0, router_cpus),
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not is_healthy(url):
                if router.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the router did not start: {Path(tmp, 'router.log').read_text()[-2000:]}")
                time.sleep(0.2)
            result = asyncio.run(load(url, router.pid, args.endpoint, prompts, args.output_len, args.warmup, args.seconds))
        finally:
            router.terminate()
            router.wait(30)
            server.stop(0)
    print(json.dumps({**environment(), "command": " ".join(sys.argv), "endpoint": args.endpoint, "concurrency": args.concurrency,
                      "input_words": args.input_len, "output_len": args.output_len, "step_ms": args.step_ms,
                      "cpus": len(cpus), "router_cpus": sorted(router_cpus), **result}, indent=1))


if __name__ == "__main__":
    main()
