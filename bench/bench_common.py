"""What `serving.py` and `hf_generate_batch.py` share: the workload, the metrics and the result JSON.

Prompts are random English words cut to an exact token count, so both benchmarks given the same
tokenizer, seed and lengths send identical prompts. The words are ASCII, so the byte offsets of the
server's /tokenize and the character offsets of a local tokenizer are the same numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import random
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be has or had "
    "first not their but its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made team game season war film house music "
    "river water light green small large early north south east west city village market garden stone "
    "road bridge morning evening winter summer paper letter story history people family friend number"
).split()

# A tokenizer as the workload needs it: text -> the start offset of each token, special tokens included.
Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Prompt:
    text: str
    num_input_tokens: int  # as the tokenizer counts them, special tokens included
    num_output_tokens: int


def draw_length(rng: random.Random, length: int, range_ratio: float) -> int:
    """`length`, or with a range ratio r, uniform in [length·(1−r), length·(1+r)] (vLLM's random dataset)."""
    if range_ratio <= 0:
        return length
    return rng.randint(max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio)))


def fit_text(tokenize: Tokenize, rng: random.Random, num_tokens: int, max_tries: int = 30) -> tuple[str, int]:
    """Random words whose tokenization is `num_tokens` long: too long, cut at the token that overflows;
    too short, add words; a cut can change the merges at the boundary, so re-check. Returns the text
    and its token count (the closest found if the exact count was never reached)."""
    text = " ".join(rng.choice(WORDS) for _ in range(num_tokens))
    best = (math.inf, text, 0)
    for _ in range(max_tries):
        starts = tokenize(text)
        if abs(len(starts) - num_tokens) < best[0]:
            best = (abs(len(starts) - num_tokens), text, len(starts))
        if len(starts) == num_tokens:
            break
        if len(starts) > num_tokens:
            text = text[: starts[num_tokens]].rstrip() or rng.choice(WORDS)
        else:
            text += "".join(" " + rng.choice(WORDS) for _ in range(num_tokens - len(starts)))
    return best[1], best[2]


def build_prompts(tokenize: Tokenize, num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                  seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        num_input, num_output = draw_length(rng, input_len, range_ratio), draw_length(rng, output_len, range_ratio)
        text, num_tokens = fit_text(tokenize, rng, num_input)
        prompts.append(Prompt(text, num_tokens, num_output))
    return prompts


def load_tokenizer(tokenizer_dir: str):
    """`tokenizer_dir/tokenizer.json` as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))


def local_tokenize(tokenizer) -> Tokenize:
    """Token start offsets from a `tokenizers.Tokenizer`, special tokens added as the router adds them."""
    return lambda text: [start for start, _ in tokenizer.encode(text).offsets]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy.percentile's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(name: str, seconds: list[float]) -> dict:
    """mean/median/p99 of `seconds`, in ms, under vLLM's key names (None when there is no sample)."""
    ms = [s * 1000 for s in seconds]
    return {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else None,
        f"median_{name}_ms": statistics.median(ms) if ms else None,
        f"p99_{name}_ms": percentile(ms, 99) if ms else None,
    }


def throughput(num_completed: int, num_failed: int, duration: float, num_input: int, num_output: int) -> dict:
    return {
        "completed": num_completed,
        "failed": num_failed,
        "duration_s": duration,
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": num_completed / duration,
        "output_throughput": num_output / duration,
        "total_token_throughput": (num_input + num_output) / duration,
    }


def environment() -> dict:
    """When, where and what: the date, the git commit (and whether the tree was dirty), the device."""
    repo = Path(__file__).resolve().parent.parent
    commit = _run(["git", "-C", str(repo), "rev-parse", "HEAD"])
    is_dirty = bool(_run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"]))
    gpus = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
    device = ", ".join(gpus.splitlines()) if gpus else f"cpu: {_cpu_name()}"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": is_dirty if commit else None,
        "device": device,
        "platform": platform.platform(),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _run(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


RESULT_ROWS = (
    ("completed", "Successful requests"), ("failed", "Failed requests"), ("duration_s", "Benchmark duration (s)"),
    ("total_input_tokens", "Total input tokens"), ("total_output_tokens", "Total generated tokens"),
    ("request_throughput", "Request throughput (req/s)"), ("output_throughput", "Output token throughput (tok/s)"),
    ("total_token_throughput", "Total token throughput (tok/s)"),
    *((f"{stat}_{name}_ms", f"{stat.capitalize()} {name.upper()} (ms)")
      for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")),
)


def format_table(results: list[dict], headers: list[str]) -> str:
    """The metrics of one or more result JSONs, one column each, in vLLM's row order."""
    lines = [f"{'':<34}" + "".join(f"{h[:22]:>24}" for h in headers)]
    for key, label in RESULT_ROWS:
        values = [r["results"].get(key) for r in results]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:<34}" + "".join(f"{_cell(v):>24}" for v in values))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def write_result(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def replay_ms(graph, repeats: int) -> float:
    """GPU time (ms) of one replay of a captured CUDA graph: the mean over `repeats` back-to-back
    replays, timed by CUDA events."""
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / repeats
