"""The serving benchmark's workload through HF transformers' continuous batching (`generate_batch`).

Same prompts as `bench/serving.py` given the same tokenizer, seed and lengths; every request generates
exactly `--output-len` tokens (EOS disabled: eos_token_id -1), greedy. All requests are submitted at
once, so compare with `serving.py --request-rate inf` and no `--max-concurrency`. Reports duration
and throughput, plus TTFT/TPOT/ITL/E2EL from transformers' per-token timestamps, in serving.py's
JSON shape (`python bench/serving.py --compare a.json b.json` prints them side by side).

`--warmup-runs` untimed passes of the whole workload come first, on a persistent manager, so the
timed pass excludes CUDA-graph capture and compilation (with 0 the timed pass includes them).
`--load-format dummy` builds the model from config.json alone with random weights.

    python bench/hf_generate_batch.py --model /tmp/llama-3.1-8b --load-format dummy \\
        --num-prompts 200 --input-len 1024 --output-len 128 --result-json hf.json
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from bench_common import (
    build_prompts, distribution, environment, format_table, load_tokenizer, local_tokenize, throughput, write_result,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model dir (config.json, tokenizer.json, weights)")
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: random weights from config.json (no checkpoint read)")
    parser.add_argument("--tokenizer", default=None, help="a dir with tokenizer.json; default: --model")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn-implementation", default=None,
                        help="passed to transformers (e.g. paged|flash_attention_2); default: its own choice")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="input lengths uniform in [len·(1−r), len·(1+r)]; outputs stay fixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-runs", type=int, default=1)
    parser.add_argument("--result-json", default=None)
    return parser.parse_args()


def load_model(args: argparse.Namespace, device: torch.device):
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    attention = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.load_format == "dummy":
        torch.manual_seed(args.seed)
        with device:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype, **attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device, **attention)
    return model.eval()


def timed_generate_batch(model, inputs: list[list[int]], output_len: int, warmup_runs: int):
    """The outputs of the timed pass and its wall time in seconds."""
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1)
    for _ in range(warmup_runs):
        model.generate_batch(inputs, generation_config=config, persistent_manager=True)
    _synchronize()
    started = time.perf_counter()
    outputs = model.generate_batch(inputs, generation_config=config, persistent_manager=True, record_timestamps=True)
    _synchronize()
    duration = time.perf_counter() - started
    model.destroy_cached_continuous_batching_manager()
    return list(outputs.values()), duration


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(outputs, num_prompts: int, output_len: int, duration: float) -> dict:
    done = [o for o in outputs if o.error is None and o.generated_tokens]
    stamped = [o for o in done if o.timestamps]
    num_output = sum(len(o.generated_tokens) for o in done)
    return {
        **throughput(len(done), num_prompts - len(done), duration, sum(len(o.prompt_ids) for o in done), num_output),
        **distribution("ttft", [o.timestamps[0] - o.created_time for o in stamped]),
        **distribution("tpot", [(o.timestamps[-1] - o.timestamps[0]) / (len(o.timestamps) - 1)
                                for o in stamped if len(o.timestamps) > 1]),
        **distribution("itl", [b - a for o in stamped for a, b in zip(o.timestamps, o.timestamps[1:])]),
        **distribution("e2el", [o.timestamps[-1] - o.created_time for o in stamped]),
        "num_output_length_mismatches": sum(len(o.generated_tokens) != output_len for o in done),
        "errors": sorted({o.error for o in outputs if o.error})[:5],
    }


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    prompts = build_prompts(local_tokenize(tokenizer), args.num_prompts, args.input_len, args.output_len,
                            args.random_range_ratio, args.seed)
    inputs = [tokenizer.encode(p.text).ids for p in prompts]
    model = load_model(args, device)
    outputs, duration = timed_generate_batch(model, inputs, args.output_len, args.warmup_runs)
    result = {
        "backend": f"hf-generate-batch (transformers {transformers.__version__})",
        **environment(),
        "config": {**vars(args), "torch": torch.__version__,
                   # Continuous batching runs paged|<this>, or a flash attention it finds installed.
                   "attn_implementation": model.config._attn_implementation},
        "results": summarize(outputs, args.num_prompts, args.output_len, duration),
    }
    print(format_table([result], ["hf generate_batch"]))
    write_result(args.result_json, result)


if __name__ == "__main__":
    main()
