"""Step time of one shard's ModelRunner, without router or gRPC: the baseline the GPU work improves.

Builds a model of a given shape with random bf16 weights (no checkpoint needed), prefills requests,
then times decode steps at several batch sizes. Prints one JSON object.

    python bench/shard_step.py --shape llama-3.1-8b --batch-sizes 1,32 --decode-steps 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import LlamaConfig

from tgi_server.distributed import SINGLE
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.models.llama import LlamaForCausalLM
from tgi_server.sampler import SamplingParams

SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}
BLOCK_SIZE = 16


def build_runner(shape: str, device: torch.device, num_blocks: int) -> ModelRunner:
    config = LlamaConfig(**SHAPES[shape])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, SINGLE, dtype, device).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    runner = ModelRunner(model, config, SINGLE, device, dtype, BLOCK_SIZE)
    runner.allocate_kv_cache(num_blocks)
    return runner


def time_decode(runner: ModelRunner, batch_size: int, prompt_len: int, num_steps: int, first_id: int) -> dict:
    """Prefills `batch_size` prompts, then runs `num_steps` decode steps; returns per-step times."""
    blocks_per_seq = -(-(prompt_len + num_steps) // BLOCK_SIZE)
    new, scheduled = [], []
    for i in range(batch_size):
        request_id = first_id + i
        blocks = list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
        new.append(NewSequence(request_id, [(7 * i + t) % 1000 + 1 for t in range(prompt_len)], SamplingParams(), 0))
        scheduled.append(ScheduledSequence(request_id, prompt_len, blocks))
    start = time.perf_counter()
    runner.step([], new, scheduled)
    prefill_s = time.perf_counter() - start
    decode = [ScheduledSequence(first_id + i, 1, []) for i in range(batch_size)]
    step_times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        runner.step([], [], decode)  # samples come back as Python ints: the step is synchronous
        step_times.append(time.perf_counter() - start)
    runner.step([first_id + i for i in range(batch_size)], [], [])
    median = statistics.median(step_times)
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "prefill_s": round(prefill_s, 4),
        "decode_step_median_ms": round(median * 1000, 3),
        "decode_step_p90_ms": round(sorted(step_times)[int(0.9 * len(step_times))] * 1000, 3),
        "output_tokens_per_s": round(batch_size / median, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    blocks_needed = max(batch_sizes) * -(-(args.prompt_len + args.decode_steps + 1) // BLOCK_SIZE) + 1
    runner = build_runner(args.shape, device, blocks_needed)
    time_decode(runner, 1, 16, 4, first_id=10_000)  # warm-up: allocator, kernels
    results = [
        time_decode(runner, b, args.prompt_len, args.decode_steps, first_id=1000 * (i + 1))
        for i, b in enumerate(batch_sizes)
    ]
    print(json.dumps({
        "benchmark": "shard_step",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
