"""The paged attention kernel on prefill-heavy steps, across tile and launch settings.

Times `tgi_server.kernels.attention.paged_attention` (Llama-3.1-8B heads: 32 query, 8 KV, dim 128,
bf16, 16-token pages) on: one 1024-token prompt, one 4096-token prompt, four 1024-token prompts, and
128 decode rows at 1,100 tokens of context beside one 1024-token prompt (a mixed step), for each
setting of PREFILL_ROWS x PREFILL_WARPS x PREFILL_STAGES; prints TFLOP/s (causal FLOPs only) and one
JSON object.

    python bench/attention_prefill.py
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import triton

from tgi_server.kernels import attention as kernels
from tgi_server.attention_metadata import AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
WORKLOADS = {  # name: [(query tokens, context before them)] per sequence
    "prompt_1024": [(1024, 0)],
    "prompt_4096": [(4096, 0)],
    "4x_prompt_1024": [(1024, 0)] * 4,
    "128_decodes_ctx1100_plus_prompt_1024": [(1, 1100)] * 128 + [(1024, 0)],
}


def build(workload, device, kv_dtype=torch.bfloat16):
    q_lens = [q for q, _ in workload]
    seq_lens = [q + c for q, c in workload]
    num_blocks = sum(-(-n // PAGE) for n in seq_lens) + 1
    tables, next_block = [], 1
    for n in seq_lens:
        count = -(-n // PAGE)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    width = max(map(len, tables))
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    block_tables = [t + [0] * (width - len(t)) for t in tables]
    attn = AttentionMetadata.from_host([0] * starts[-1], starts, seq_lens, block_tables, device)
    kv_cache = torch.randn(2, num_blocks, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16).to(kv_dtype)
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    flops = sum(4 * HEADS * HEAD_DIM * qn * (c + (qn + 1) / 2) for qn, c in workload)
    kv_bytes = sum(2 * (qn + c) * KV_HEADS * HEAD_DIM * kv_dtype.itemsize for qn, c in workload)
    return q, kv_cache, attn, flops, kv_bytes


def sweep(workloads: dict, settings: dict[str, tuple], device, kv_dtype=torch.bfloat16) -> list[dict]:
    """Times `paged_attention` on each workload at every combination of `settings` (module constant
    of `tgi_server.kernels.attention` -> values), over a KV cache of `kv_dtype`; one result row per
    run, also printed to stderr."""
    torch.manual_seed(0)
    results = []
    for name, workload in workloads.items():
        q, kv_cache, attn, flops, kv_bytes = build(workload, device, kv_dtype)
        reference = None
        for values in itertools.product(*settings.values()):
            setting = dict(zip(settings, values))
            for constant, value in setting.items():
                setattr(kernels, constant, value)
            label = " ".join(f"{constant.lower()} {value}" for constant, value in setting.items())
            try:
                out = kernels.paged_attention(q, kv_cache, attn, HEAD_DIM**-0.5, None)
            except triton.runtime.errors.OutOfResources as error:
                print(f"{name:40s} {label}: {error}", file=sys.stderr)
                continue
            if reference is None:
                reference = out.float()
            error = ((out.float() - reference).norm() / reference.norm()).item()
            ms = triton.testing.do_bench(lambda: kernels.paged_attention(q, kv_cache, attn, HEAD_DIM**-0.5, None), return_mode="median")
            row = {"workload": name, "kv_dtype": str(kv_dtype).removeprefix("torch."),
                   **{c.lower(): v for c, v in setting.items()}, "ms": round(ms, 4),
                   "tflop_s": round(flops / ms / 1e9, 1), "kv_tb_s": round(kv_bytes / ms / 1e9, 2), "error_vs_first": error}
            results.append(row)
            print(f"{name:40s} {row['kv_dtype']} {label}: {ms:.4f} ms {row['tflop_s']:7.1f} TFLOP/s {row['kv_tb_s']:.2f} TB/s KV  err {error:.1e}",
                  file=sys.stderr, flush=True)
    return results


def main() -> None:
    settings = {"PREFILL_ROWS": (64, 128), "PREFILL_WARPS": (4, 8), "PREFILL_STAGES": (2, 3)}
    results = sweep(WORKLOADS, settings, torch.device("cuda"))
    print(json.dumps({"benchmark": "attention_prefill", "device": torch.cuda.get_device_name(), "results": results}))


if __name__ == "__main__":
    main()
