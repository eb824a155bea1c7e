"""Serving benchmark: concurrent streaming clients against a running server, as vLLM's benchmark_serving.

Every request asks for exactly `--output-len` new tokens (`ignore_eos: true`), with a prompt of exactly
`--input-len` tokens (random words cut with the server's /tokenize, or with `--tokenizer DIR`).
Requests start all at once (`--request-rate inf`, the default) or as a Poisson process, at most
`--max-concurrency` in flight. Reports TTFT, TPOT (per output token after the first), ITL (every gap
between streamed tokens) and end-to-end latency as mean/median/p99, and request, output-token and
total-token throughput; prints a table and writes JSON (`--result-json`) with the config, date, git
commit and device.

    # against a running server
    python bench/serving.py --num-prompts 200 --input-len 1024 --output-len 128 --max-concurrency 64
    # one command on a fresh machine: start the launcher, measure, stop it
    python bench/serving.py --launch "--model-id /tmp/llama-8b --load-format dummy" --result-json out.json
    # results side by side (e.g. with bench/hf_generate_batch.py's)
    python bench/serving.py --compare out.json hf.json
    # multi-turn chat: 64 conversations of 6 turns over one 2,000-token system prompt, each turn a
    # 100-token user message after the conversation so far (TTFT of first and later turns apart)
    python bench/serving.py --multi-turn 64 --turns 6 --system-prompt-len 2000 --input-len 100 --output-len 100
    # the same, conversations starting 4 a second and users pausing 2 s on average between turns
    python bench/serving.py --multi-turn 64 --request-rate 4 --think-time 2 ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench_common import (
    Prompt, build_prompts, distribution, environment, format_table, load_tokenizer, local_tokenize, throughput,
    write_result,
)


@dataclass
class RequestResult:
    is_ok: bool = False
    error: str | None = None
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the server's prefix cache served, where it says
    text: str = ""  # the streamed answer (multi-turn chat sends it back in the next turn)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:3000")
    parser.add_argument("--endpoint", choices=("generate", "chat"), default="generate",
                        help="generate: /generate_stream; chat: /v1/chat/completions with stream (the chat "
                             "template adds its tokens to --input-len)")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths uniform in [len·(1−r), len·(1+r)]; 0: fixed lengths")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--tokenizer", default=None, help="a dir with tokenizer.json; default: the server's /tokenize")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests before the measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grammar-schemas", type=int, default=0, metavar="N",
                        help="structured workload: request i is constrained by JSON schema i %% N (N distinct "
                             "schemas, each an object holding an array of strings, which never completes early); 0: none")
    parser.add_argument("--multi-turn", type=int, default=0, metavar="N",
                        help="a multi-turn chat workload of N conversations (chat route): --turns user messages of "
                        "--input-len tokens each, every one sent with the conversation so far (a system prompt of "
                        "--system-prompt-len tokens, earlier messages and answers); --num-prompts is ignored")
    parser.add_argument("--turns", type=int, default=6, help="user messages per conversation (--multi-turn)")
    parser.add_argument("--system-prompt-len", type=int, default=2000,
                        help="tokens of the system prompt every conversation shares (--multi-turn)")
    parser.add_argument("--think-time", type=float, default=0.0, metavar="SECONDS",
                        help="mean pause between an answer and the next user message, exponentially distributed "
                        "(--multi-turn; 0: none). With a finite --request-rate, conversations also start as a "
                        "Poisson process at that rate instead of all at once")
    parser.add_argument("--rewrite", default=None, metavar="TEXT_FILE",
                        help="input-grounded prompts: 'Repeat the following text exactly' and a slice of about "
                        "--input-len tokens of this file (each prompt its own slice), for speculative decoding")
    parser.add_argument("--adapters", default="", metavar="ID,ID,...",
                        help="LoRA adapters the server has loaded: measured request i names adapter i %% N "
                        "(TGI's parameters.adapter_id, or the OpenAI model field on the chat route); none: the base model")
    parser.add_argument("--result-json", default=None)
    parser.add_argument("--launch", default=None, metavar="LAUNCHER_ARGS",
                        help="start `text-generation-launcher LAUNCHER_ARGS` first and stop it at the end")
    parser.add_argument("--launch-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    parser.add_argument("--launch-log", default=None, help="the launcher's output (default: a temp file)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                        help="print the results of these JSON files side by side and exit")
    return parser.parse_args(argv)


def schema_for(index: int | None, args: argparse.Namespace) -> dict | None:
    """Request `index`'s JSON schema in the structured workload (None without one): an object whose one
    required property (named after the schema) is an array of strings, which can grow for ever, so the
    request runs to its output length like an unconstrained one."""
    if not args.grammar_schemas or index is None:
        return None
    name = f"items_{index % args.grammar_schemas}"
    return {"type": "object", "properties": {name: {"type": "array", "items": {"type": "string"}}}, "required": [name]}


def request_for(prompt: Prompt, args: argparse.Namespace, index: int | None = None) -> tuple[str, dict]:
    """The route and body of one benchmark request: exactly `num_output_tokens` tokens, EOS ignored."""
    schema = schema_for(index, args)
    adapters = args.adapters.split(",") if args.adapters else []
    adapter = adapters[index % len(adapters)] if adapters and index is not None else None
    if args.endpoint == "chat":
        body = {
            "model": adapter or "tgi", "messages": [{"role": "user", "content": prompt.text}],
            "max_tokens": prompt.num_output_tokens, "ignore_eos": True, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
        return "/v1/chat/completions", body
    parameters = {"max_new_tokens": prompt.num_output_tokens, "ignore_eos": True, "details": True,
                  "decoder_input_details": False}
    if args.temperature > 0:
        parameters.update(do_sample=True, temperature=args.temperature)
    if schema is not None:
        parameters["grammar"] = {"type": "json", "value": schema}
    if adapter is not None:
        parameters["adapter_id"] = adapter
    return "/generate_stream", {"inputs": prompt.text, "parameters": parameters}


async def send(session: aiohttp.ClientSession, base_url: str, path: str, body: dict, num_input_tokens: int) -> RequestResult:
    """One streaming request, timed per token event (each SSE event of this server carries one token)."""
    result = RequestResult(num_input_tokens=num_input_tokens)
    started = last = time.perf_counter()
    try:
        async with session.post(base_url + path, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                event = _event(line)
                if event is None or event == "[DONE]":
                    continue
                if "error" in event:
                    error = event["error"]
                    result.error = (error if isinstance(error, str) else json.dumps(error))[:200]
                    return result
                if event.get("token") or event.get("choices"):
                    result.text += _text(event)
                    now = time.perf_counter()
                    if result.num_output_tokens == 0:
                        result.ttft = now - started
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.num_output_tokens += 1
                _read_counts(event, result)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:  # ValueError: a bad or huge event
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.latency = time.perf_counter() - started
    result.is_ok = result.num_output_tokens > 0
    result.error = None if result.is_ok else "no token received"
    return result


def _event(line: bytes):
    text = line.decode().strip()
    if not text.startswith("data:"):
        return None
    data = text[len("data:"):].strip()
    return data if data == "[DONE]" else json.loads(data)


def _text(event: dict) -> str:
    if event.get("token"):
        return "" if event["token"].get("special") else event["token"]["text"]
    return "".join(choice["delta"].get("content") or "" for choice in event["choices"])


def _read_counts(event: dict, result: RequestResult) -> None:
    """The server's own token counts, where it sends them (TGI's final details, OpenAI's usage chunk)."""
    details, usage = event.get("details"), event.get("usage")
    if details:
        result.num_output_tokens = details["generated_tokens"]
        result.num_input_tokens = details.get("input_length", result.num_input_tokens)
        result.num_cached_tokens = details.get("cached_tokens", 0)
    elif usage:
        result.num_output_tokens = usage["completion_tokens"]
        result.num_input_tokens = usage["prompt_tokens"]
        result.num_cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def run_requests(base_url: str, prompts: list[Prompt], args, is_measured: bool = True) -> tuple[list[RequestResult], float]:
    """Sends `prompts` at `--request-rate`, at most `--max-concurrency` at a time; returns the results
    and the wall time from the first send to the last token."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    arrivals = random.Random(args.seed + 1)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(prompt: Prompt, index: int) -> RequestResult:
            async with limit:
                path, body = request_for(prompt, args, index if is_measured else None)
                return await send(session, base_url, path, body, prompt.num_input_tokens)

        started = time.perf_counter()
        tasks = []
        for index, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(one(prompt, index)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - started


async def run_conversations(base_url: str, system: str, conversations: list[list[Prompt]], args) -> tuple[list[list[RequestResult]], float]:
    """Every conversation at once (at most `--max-concurrency` requests in flight), or starting as a
    Poisson process at `--request-rate`; its turns one after the other, `--think-time` apart on average:
    turn k sends the system prompt, the first k user messages and the k - 1 answers."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    rng = random.Random(args.seed + 1)
    starts = list(itertools.accumulate(rng.expovariate(args.request_rate) if math.isfinite(args.request_rate) else 0.0
                                       for _ in conversations))
    pauses = [[rng.expovariate(1 / args.think_time) if args.think_time > 0 else 0.0 for _ in turns] for turns in conversations]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def converse(turns: list[Prompt], start: float, pauses: list[float]) -> list[RequestResult]:
            await asyncio.sleep(start)
            messages, results = [{"role": "system", "content": system}], []
            for i, turn in enumerate(turns):
                if i:
                    await asyncio.sleep(pauses[i])
                messages.append({"role": "user", "content": turn.text})
                body = {"model": "tgi", "messages": messages, "max_tokens": turn.num_output_tokens, "ignore_eos": True,
                        "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
                async with limit:
                    result = await send(session, base_url, "/v1/chat/completions", body, 0)
                results.append(result)
                if not result.is_ok:
                    break
                messages.append({"role": "assistant", "content": result.text})
            return results

        started = time.perf_counter()
        results = await asyncio.gather(*(converse(turns, start, pause) for turns, start, pause in zip(conversations, starts, pauses)))
    return results, time.perf_counter() - started


def summarize(results: list[RequestResult], prompts: list[Prompt], duration: float) -> dict:
    done = [r for r in results if r.is_ok]
    num_input = sum(r.num_input_tokens for r in done)
    num_output = sum(r.num_output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.num_output_tokens - 1) for r in done if r.num_output_tokens > 1]
    mismatches = sum(r.num_output_tokens != p.num_output_tokens for r, p in zip(results, prompts) if r.is_ok)
    errors = sorted({r.error for r in results if r.error})
    return {
        **throughput(len(done), len(results) - len(done), duration, num_input, num_output),
        **distribution("ttft", [r.ttft for r in done]),
        **distribution("tpot", tpots),
        **distribution("itl", [gap for r in done for gap in r.itls]),
        **distribution("e2el", [r.latency for r in done]),
        "num_output_length_mismatches": mismatches,
        "errors": errors[:5],
    }


def remote_tokenize(base_url: str):
    """Token start offsets from the server's /tokenize (byte offsets; the prompts are ASCII)."""
    def tokenize(text: str) -> list[int]:
        request = urllib.request.Request(base_url + "/tokenize", data=json.dumps({"inputs": text}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return [token["start"] for token in json.load(response)]
    return tokenize


def get_json(url: str) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    return None


@contextlib.contextmanager
def launched_server(launcher_args: str, timeout: float, log_path: str | None):
    """Runs `text-generation-launcher` (this Python's tgi_launcher) until /health answers; yields its URL,
    then stops it (SIGTERM to its process group, SIGKILL after 60 s)."""
    args = shlex.split(launcher_args)
    port = _option(args, "--port")
    if port is None:
        port = str(_free_port())
        args += ["--port", port, "--hostname", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    log_path = log_path or tempfile.mkstemp(prefix="launcher-", suffix=".log")[1]
    print(f"launching text-generation-launcher {shlex.join(args)} (log: {log_path})", file=sys.stderr)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tgi_launcher", *args], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, process, timeout, log_path)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = open(log_path, errors="replace").read()[-4000:]
            raise SystemExit(f"launcher exited with {process.returncode} before /health answered:\n{tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1.0)
    raise SystemExit(f"server not healthy after {timeout:.0f} s (log: {log_path})")


def rewrite_prompts(tokenize, text: str, num_prompts: int, input_len: int, output_len: int) -> list[Prompt]:
    """Prompts asking to repeat a slice of `text` of about `input_len` tokens (slices start a tenth of
    the text apart, wrapping around): the answer is grounded in the input, as a rewrite is."""
    words = text.split()
    prompts = []
    for index in range(num_prompts):
        start = index * max(1, len(words) // 10) % max(1, len(words))
        chunk = " ".join((words[start:] + words[:start])[:input_len])  # a word is at least one token
        offsets = tokenize(chunk)
        if len(offsets) > input_len:
            chunk = chunk[: offsets[input_len]]
        body = f"Repeat the following text exactly, word for word:\n\n{chunk}\n\nThe text again:\n"
        prompts.append(Prompt(body, len(tokenize(body)), output_len))
    return prompts


def benchmark(base_url: str, args) -> dict:
    tokenize = local_tokenize(load_tokenizer(args.tokenizer)) if args.tokenizer else remote_tokenize(base_url)
    if args.multi_turn:
        return _result(base_url, args, benchmark_conversations(base_url, tokenize, args))
    # Warm-up prompts come after the measured ones (same draws as a run without warm-up, and no prompt
    # the measurement sends has been seen by a prefix cache).
    if args.rewrite:
        prompts = rewrite_prompts(tokenize, Path(args.rewrite).read_text(), args.num_prompts + args.warmup,
                                  args.input_len, args.output_len)
    else:
        prompts = build_prompts(tokenize, args.num_prompts + args.warmup, args.input_len, args.output_len,
                                args.random_range_ratio, args.seed)
    prompts, warmup_prompts = prompts[: args.num_prompts], prompts[args.num_prompts :]
    if warmup_prompts:
        warmup, _ = asyncio.run(run_requests(base_url, warmup_prompts, args, is_measured=False))  # no grammar
        if not all(r.is_ok for r in warmup):
            raise SystemExit(f"warm-up request failed: {next(r.error for r in warmup if not r.is_ok)}")
    results, duration = asyncio.run(run_requests(base_url, prompts, args))
    summary = summarize(results, prompts, duration)
    if args.grammar_schemas:  # request i < N is the first to use its schema: its TTFT includes the compile
        first = [r.ttft for r in results[: args.grammar_schemas] if r.is_ok]
        later = [r.ttft for r in results[args.grammar_schemas :] if r.is_ok]
        summary.update(distribution("ttft_new_schema", first), **distribution("ttft_cached_schema", later))
    return _result(base_url, args, summary)


def benchmark_conversations(base_url: str, tokenize, args) -> dict:
    """The multi-turn chat workload (--multi-turn); the TTFT of first turns and of later ones apart,
    and how many prompt tokens the server's prefix cache served."""
    num_turns = args.multi_turn * args.turns
    (system,) = build_prompts(tokenize, 1, args.system_prompt_len, 1, 0.0, args.seed + 2)
    turns = build_prompts(tokenize, num_turns + args.warmup, args.input_len, args.output_len,
                          args.random_range_ratio, args.seed)
    if args.warmup:  # a different system prompt: nothing the measurement sends is cached by it
        warmup, _ = asyncio.run(run_conversations(base_url, "You are a warm-up.", [turns[num_turns:]], args))
        if not all(r.is_ok for r in warmup[0]):
            raise SystemExit(f"warm-up request failed: {next(r.error for r in warmup[0] if not r.is_ok)}")
    conversations = [turns[i * args.turns : (i + 1) * args.turns] for i in range(args.multi_turn)]
    results, duration = asyncio.run(run_conversations(base_url, system.text, conversations, args))
    flat = [r for conversation in results for r in conversation]
    expected = [turn for conversation, done in zip(conversations, results) for turn in conversation[: len(done)]]
    summary = summarize(flat, expected, duration)
    summary.update(distribution("ttft_first_turn", [c[0].ttft for c in results if c and c[0].is_ok]),
                   **distribution("ttft_later_turns", [r.ttft for c in results for r in c[1:] if r.is_ok]))
    summary["failed"] += num_turns - len(flat)  # turns never sent after a failure
    summary["total_cached_input_tokens"] = sum(r.num_cached_tokens for r in flat if r.is_ok)
    return summary


def _result(base_url: str, args, summary: dict) -> dict:
    return {
        "backend": "tgi-py",
        **environment(),
        "config": {**vars(args), "base_url": base_url, "request_rate": str(args.request_rate)},
        "server_info": get_json(base_url + "/info"),
        "results": summary,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        results = [json.load(open(path)) for path in args.compare]
        names = [Path(path).stem for path in args.compare]
        for name, result in zip(names, results):
            print(f"{name}: {result.get('backend')}, {result.get('device')}, {result.get('date')}")
        print(format_table(results, names))
        return
    with launched_server(args.launch, args.launch_timeout, args.launch_log) if args.launch \
            else contextlib.nullcontext(args.base_url) as base_url:
        result = benchmark(base_url, args)
    print(format_table([result], [result["backend"]]))
    if result["results"]["errors"]:
        print("errors:", *result["results"]["errors"], sep="\n  ")
    write_result(args.result_json, result)


if __name__ == "__main__":
    main()
