"""The summary of paired serving runs (bench/lora.sh, bench/multi_node.sh): for each run name, one stream's
tok/s (from single_<run>.json's median TPOT) and the concurrent run's output tok/s (c<N>_<run>.json), then
each compared pair's ratios, and where they ran. Written to OUT/<name>_summary.json and printed.

    python bench/pair_summary.py OUT 64 lora plain_base lora_base lora_adapters --compare plain_base:lora_adapters:adapters_over_plain
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("concurrency")
    parser.add_argument("name", help="the summary file's prefix")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--compare", action="append", default=[], metavar="BASE:OTHER:LABEL",
                        help="adds LABEL_<field>: OTHER's figure over BASE's, for each field")
    args = parser.parse_args()
    many_field = f"c{args.concurrency}_output_tok_s"
    summary = {}
    for run in args.runs:
        single, many = load(args.out, f"single_{run}"), load(args.out, f"c{args.concurrency}_{run}")
        summary[run] = {
            "single_stream_tok_s": round(1000 / single["results"]["median_tpot_ms"], 1) if single else None,
            many_field: round(many["results"]["output_throughput"], 1) if many else None,
            "failed": sum(result["results"]["failed"] for result in (single, many) if result),
        }
    for comparison in args.compare:
        base, other, label = comparison.split(":")
        for field in ("single_stream_tok_s", many_field):
            if summary[base][field] and summary[other][field]:
                summary[f"{label}_{field}"] = round(summary[other][field] / summary[base][field], 3)
    first = load(args.out, f"single_{args.runs[0]}")
    for key, source in (("device", "device"), ("date", "date"), ("commit", "git_commit")):
        summary[key] = first.get(source) if first else None
    (args.out / f"{args.name}_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
