"""Soak: a real server under mixed load for a long time; nothing lost, no 5xx, memory flat.

Starts `text-generation-launcher` (tiny random Llama on CPU, a KV cache small enough for preemptions)
and keeps `--concurrency` clients busy for `--duration` seconds with a mix of requests: /generate,
/generate_stream, OpenAI chat (plain and streamed), streams the client abandons midway, clients that
close the connection at a random moment (before the response headers, often) on every streaming route,
and invalid requests, which must get their 4xx error JSON. Every request must end as expected: a request that
ends otherwise is failed, one that never ends is lost. Samples the resident memory (and open file
descriptors) of the router and the shards every `--sample-seconds`; growth compares the median RSS
of the first `--window` seconds after `--warmup` with that of the last `--window` seconds of load
(a shard's RSS swings by hundreds of MB from step to step with the batch's activations, so single
samples would not do). Writes bench/results/<date>-cpu-soak.json.

    python bench/soak.py --duration 600 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from server_helpers import build_tiny_llama, running_server  # noqa: E402

SERVER_ARGS = ("--max-batch-total-tokens", "4096", "--max-total-tokens", "256", "--max-input-tokens", "128")
WORDS = "the a cat dog ship rain train map story tells of river light stone city night song green old".split()
KINDS = {"generate": 3, "stream": 3, "chat": 2, "chat_stream": 2, "cancelled": 2, "dropped": 2, "invalid": 2}
# (request arguments, expected status) of the invalid requests.
INVALID = [
    ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ({"data": "inputs=hi", "headers": {"Content-Type": "text/plain"}}, 415),
    ({"json": {"inputs": "hi", "parameters": {"top_p": 1.5}}}, 422),
    ({"json": {"inputs": "hi", "parameters": {"max_new_tokens": -1}}}, 422),
    ({"json": {"inputs": "hi", "parameters": {"max_new_tokens": 10**6}}}, 422),
    ({"json": {"inputs": " ".join(["word"] * 400)}}, 422),
]
REQUEST_TIMEOUT_SECONDS = 120


class Outcome(Exception):
    """A request that did not end as expected; the message is its category."""


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


async def sse_lines(response: aiohttp.ClientResponse) -> list[str]:
    return [line.decode()[5:].strip() async for line in response.content if line.startswith(b"data:")]


async def run_one(session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random, statuses) -> None:
    """One request of `kind`; returns if it ended as expected, else raises Outcome."""
    num_tokens = rng.randint(1, 64)
    generate = {"inputs": prompt(rng), "parameters": {"max_new_tokens": num_tokens}}
    chat = {"messages": [{"role": "user", "content": prompt(rng)}], "max_tokens": num_tokens}
    if kind == "dropped":
        await drop_connection(url, rng, generate, chat, num_tokens)
        return
    if kind == "invalid":
        arguments, expected = rng.choice(INVALID)
        async with session.post(url + "/generate", **arguments) as response:
            statuses[response.status] += 1
            body = await response.json(content_type=None)
            if response.status != expected or not body.get("error") or not body.get("error_type"):
                raise Outcome(f"invalid request answered {response.status}")
        return
    path, body = {"generate": ("/generate", generate), "stream": ("/generate_stream", generate),
                  "cancelled": ("/generate_stream", generate), "chat": ("/v1/chat/completions", chat),
                  "chat_stream": ("/v1/chat/completions", {**chat, "stream": True})}[kind]
    async with session.post(url + path, json=body) as response:
        statuses[response.status] += 1
        if response.status != 200:
            raise Outcome(f"{kind} answered {response.status}")
        if kind == "cancelled":
            await response.content.readline()  # at least one event, then the client goes away
            response.close()
        elif kind == "generate":
            if "generated_text" not in await response.json():
                raise Outcome("generate without generated_text")
        elif kind == "chat":
            if not (await response.json())["choices"]:
                raise Outcome("chat without choices")
        else:
            events = await sse_lines(response)
            last = events[-1] if events else ""
            if kind == "chat_stream" and last != "[DONE]":
                raise Outcome("chat stream without [DONE]")
            if kind == "stream" and (not last or json.loads(last).get("generated_text") is None):
                raise Outcome("stream without its final event")


async def drop_connection(url: str, rng: random.Random, generate: dict, chat: dict, num_tokens: int) -> None:
    """A streaming request whose client closes the connection 0-50 ms after sending it, often before
    the response headers: the server must drop it (the gauges after the load say whether it did)."""
    path, body = rng.choice([
        ("/generate_stream", generate), ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/completions", {"prompt": generate["inputs"], "max_tokens": num_tokens, "stream": True}),
    ])
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.05))
    writer.close()


class Load:
    """Counts of what the clients sent and how it ended."""

    def __init__(self):
        self.sent = collections.Counter()
        self.completed = collections.Counter()
        self.failed = collections.Counter()
        self.failures = collections.Counter()
        self.statuses = collections.Counter()
        self.latencies = collections.defaultdict(list)

    async def client(self, session: aiohttp.ClientSession, url: str, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            self.sent[kind] += 1
            started = time.monotonic()
            try:
                await asyncio.wait_for(run_one(session, url, kind, rng, self.statuses), REQUEST_TIMEOUT_SECONDS)
            except (Outcome, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as error:
                self.failed[kind] += 1
                self.failures[str(error) or type(error).__name__] += 1
            else:
                self.completed[kind] += 1
                self.latencies[kind].append(time.monotonic() - started)


def processes(launcher_pid: int) -> dict[str, psutil.Process]:
    """The router and the shards among the launcher's children, by name."""
    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "tgi_router" in cmdline:
            found["router"] = child
        elif "tgi_server serve" in cmdline:
            found[f"shard {cmdline.split('--rank ')[1].split()[0] if '--rank' in cmdline else 0}"] = child
    return found


async def sample_memory(launcher_pid: int, started: float, every: float, samples: list, stop: asyncio.Event):
    procs = processes(launcher_pid)
    while not stop.is_set():
        sample = {"t": round(time.monotonic() - started, 1)}
        for name, proc in procs.items():
            sample[name] = {"rss_mb": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds()}
        samples.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


def growth(samples: list[dict], warmup: float, end: float, window: float) -> dict[str, float]:
    """Each process's median RSS over the last `window` s of load against the first `window` s after
    warm-up, as a fraction (0.05 is 5% more)."""
    first = [s for s in samples if warmup <= s["t"] < warmup + window]
    last = [s for s in samples if end - window <= s["t"] <= end]
    if not first or not last or first[-1]["t"] >= last[0]["t"]:
        return {}
    names = [k for k in first[0] if k != "t"]
    return {name: round(statistics.median(s[name]["rss_mb"] for s in last)
                        / statistics.median(s[name]["rss_mb"] for s in first) - 1, 4) for name in names}


async def gauges(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    wanted = ("tgi_batch_current_max_tokens", "tgi_batch_current_size", "tgi_queue_size")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}


async def soak(url: str, launcher_pid: int, args) -> dict:
    load, samples, stop = Load(), [], asyncio.Event()
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample_memory(launcher_pid, started, args.sample_seconds, samples, stop))
        deadline = started + args.duration
        clients = [asyncio.create_task(load.client(session, url, seed, deadline)) for seed in range(args.concurrency)]
        _, pending = await asyncio.wait(clients, timeout=args.duration + REQUEST_TIMEOUT_SECONDS + 30)
        for task in pending:
            task.cancel()
        await asyncio.sleep(1)  # the last cancelled streams reach the engine
        after = await gauges(session, url)
        async with session.get(url + "/health") as response:
            is_healthy = response.status == 200
        stop.set()
        await sampler
    elapsed = time.monotonic() - started
    num_sent, num_completed, num_failed = (sum(c.values()) for c in (load.sent, load.completed, load.failed))
    return {
        "duration_s": round(elapsed, 1),
        "requests": {
            "sent": num_sent, "completed": num_completed, "failed": num_failed,
            "lost": num_sent - num_completed - num_failed,
            "by_kind": {k: {"sent": load.sent[k], "completed": load.completed[k], "failed": load.failed[k]} for k in KINDS},
            "failures": dict(load.failures),
            "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
            "num_5xx": sum(v for k, v in load.statuses.items() if k >= 500),
            "per_second": round(num_completed / elapsed, 1),
            "latency_s_p50_p99": {k: [round(statistics.median(v), 3), round(sorted(v)[int(0.99 * (len(v) - 1))], 3)]
                                  for k, v in load.latencies.items() if v},
        },
        "after_load": {"healthy": is_healthy, **after},
        "rss_mb_peak": {name: max(s[name]["rss_mb"] for s in samples) for name in samples[0] if name != "t"},
        "memory": samples,
        "rss_growth_after_warmup": growth(samples, args.warmup, args.duration, args.window),
    }


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                        platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def git_commit() -> str:
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="Seconds of load.")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=60, help="Seconds before memory growth is measured.")
    parser.add_argument("--sample-seconds", type=float, default=5)
    parser.add_argument("--window", type=float, default=60, help="Seconds of samples each RSS median covers.")
    parser.add_argument("--out", type=Path, default=None, help="Default: bench/results/<date>-cpu-soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tgi-soak-") as workdir:
        work = Path(workdir)
        model = build_tiny_llama(work / "llama", work / "hf_home")
        with running_server(str(model), work / "hf_home", *SERVER_ARGS) as server:
            result = asyncio.run(soak(server.url, server.process.pid, args))
        result["launcher_exit_code"] = server.process.returncode
    requests, rss = result["requests"], result["rss_growth_after_warmup"]
    result["passed"] = (requests["lost"] == 0 and requests["failed"] == 0 and requests["num_5xx"] == 0
                        and bool(rss) and all(g < 0.10 for g in rss.values())
                        and result["after_load"].get("tgi_batch_current_max_tokens") == 0)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "commit": git_commit(),
        "command": "python " + " ".join(sys.argv),
        "what": "launcher + router + 1 shard, tiny random Llama on CPU, mixed load; server args: " + " ".join(SERVER_ARGS),
        "target": "0 lost, 0 failed, 0 5xx, RSS growth < 10% after warm-up, every KV block free after the load",
        **result,
    }
    out = args.out or ROOT / "bench" / "results" / f"{report['date']}-cpu-soak.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: report[k] for k in ("passed", "duration_s", "rss_growth_after_warmup", "after_load")}
    print(json.dumps({**summary, "requests": {k: v for k, v in requests.items() if k != "by_kind"}}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
