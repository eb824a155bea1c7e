"""Where a one-stream decode step's time goes: GPU busy time against the gaps between GPU work.

Builds the 8B-shaped runner with CUDA graphs, prefills one prompt and runs lookahead decode steps
back to back, the way the router drives a lone request (each plan decodes the token the last step
sampled, `lookahead=True`). The last steps run under torch.profiler, with the runner's own
functions marked; prints per step: wall time, GPU busy time, and each GPU idle gap with the host
functions that ran during it. Writes the Chrome trace to --trace (gzip).

    python bench/decode_timeline.py --steps 48 --trace /tmp/out/decode_timeline.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time

import torch

from shard_step import BLOCK_SIZE, build_runner
from tgi_server import cuda_graphs, lookahead, model_runner
from tgi_server.lookahead import Lookahead
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.sampler import SamplingParams

MARKED = [  # (module or class, function name): shown as ranges in the trace
    (ModelRunner, "step"),
    (Lookahead, "take"),
    (Lookahead, "collect"),
    (Lookahead, "start"),
    (Lookahead, "chain"),
    (ModelRunner, "_forward_and_sample"),
    (ModelRunner, "_sample"),
    (cuda_graphs.DecodeGraphs, "run"),
    (model_runner.SamplingBatch, "build"),
    (model_runner, "sample"),
    (lookahead, "sample"),
]


def mark_functions() -> None:
    for owner, name in MARKED:
        original = getattr(owner, name)
        is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), (staticmethod, classmethod))
        function = original if not is_static else owner.__dict__[name].__func__

        def marked(*args, _function=function, _label=f"tgi:{name}", **kwargs):
            with torch.profiler.record_function(_label):
                return _function(*args, **kwargs)

        if isinstance(owner, type) and isinstance(owner.__dict__.get(name), classmethod):
            setattr(owner, name, classmethod(lambda cls, *a, _m=marked, **k: _m(cls, *a, **k)))
        elif is_static:
            setattr(owner, name, staticmethod(marked))
        else:
            setattr(owner, name, marked)


def run_steps(runner: ModelRunner, request_id: int, prompt_len: int, steps: int) -> list[float]:
    blocks = list(range(1, 2 + (prompt_len + steps + 2) // BLOCK_SIZE))
    prompt = [(request_id * 7 + i) % 1000 + 1 for i in range(prompt_len)]
    runner.step([], [NewSequence(request_id, prompt, SamplingParams(), 0)], [ScheduledSequence(request_id, prompt_len, blocks)], lookahead=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step([], [], [ScheduledSequence(request_id, 1, [])], lookahead=True)
        times.append(time.perf_counter() - start)
    runner.step([request_id], [], [])
    return times


def analyse(trace: dict) -> dict:
    """Per profiled step: its wall time, and the GPU's busy time and idle gaps (with the host ranges
    that ran during each gap) from the step's start to the next step's start."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    steps = sorted((e for e in events if e.get("name") == "tgi:step"), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in ("user_annotation", "cuda_runtime", "cpu_op") and e.get("name") != "tgi:step"]
    rows = []
    for step, next_step in zip(steps[1:-1], steps[2:]):
        start, end = step["ts"], next_step["ts"]
        busy, gaps = 0.0, []
        for before, after in zip(gpu, gpu[1:]):
            idle_from = before["ts"] + before["dur"]
            if start <= before["ts"] < end:
                busy += before["dur"]
            if start <= idle_from < end and after["ts"] - idle_from > 5:
                during = sorted((h for h in host if h["ts"] < after["ts"] and h["ts"] + h["dur"] > idle_from), key=lambda h: h["ts"])
                gaps.append({
                    "us": round(after["ts"] - idle_from, 1),
                    "after": before["name"][:40],
                    "host": [f"{h['name'][:40]} {h['dur']:.0f}us" for h in during if h["dur"] > 3][:16],
                })
        rows.append({"period_us": round(end - start, 1), "call_us": round(step["dur"], 1), "gpu_busy_us": round(busy, 1), "gaps": gaps})
    return {"steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--profiled-steps", type=int, default=12)
    parser.add_argument("--trace", help="Write the Chrome trace here (gzip).")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: only checks this script
    max_total = args.prompt_len + args.steps + 16
    graph_sizes = (1, 2, 4, 8) if device.type == "cuda" else ()
    runner = build_runner(args.shape, device, 4 * (max_total // BLOCK_SIZE + 2), graph_sizes, max_total)
    times = run_steps(runner, 1, args.prompt_len, args.steps)
    mark_functions()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_steps(runner, 2, args.prompt_len, args.profiled_steps)
    path = "/tmp/decode_timeline_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    if args.trace:
        with gzip.open(args.trace, "wt") as f:
            json.dump(trace, f)
    report = analyse(trace)
    report["unprofiled_step_median_ms"] = round(statistics.median(times[8:]) * 1000, 3)
    for row in report["steps"][-3:]:
        print(f"step period {row['period_us']} us (call {row['call_us']} us), GPU busy {row['gpu_busy_us']} us", file=sys.stderr)
        for gap in row["gaps"]:
            print(f"   gap {gap['us']} us after {gap['after']}: {'; '.join(gap['host'])}", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
