"""The router's tokenizing time for long prompts, whole on one thread against cut into pieces on
several (`tgi_router.tokenizer`, `MAX_PIECES`): the prompt is tokenized before its first step, so this
time is part of the time to the first token. Prompts are bench_common's random words, as
`serving.py` sends them. Prints JSON: per prompt length, the best of `--repeats` runs each way and
whether the ids agree.

    python bench/tokenize_pieces.py [--tokenizer-dir bench/assets/llama-3.1-tokenizer] [--tokens 1024,4096,16384]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import tgi_router.tokenizer as tokenizer_module
from bench_common import WORDS, environment
from tgi_router.tokenizer import Tokenizer


def best_ms(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", default=str(Path(__file__).parent / "assets" / "llama-3.1-tokenizer"))
    parser.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths, about, in tokens")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(args.tokenizer_dir)
    rng = random.Random(0)
    pieces = tokenizer_module.MAX_PIECES
    results = []
    for num_tokens in map(int, args.tokens.split(",")):
        text = " ".join(rng.choice(WORDS) for _ in range(num_tokens))
        tokenizer_module.MAX_PIECES = 1
        whole_ids, whole_ms = tokenizer.encode(text), best_ms(lambda: tokenizer.encode(text), args.repeats)
        tokenizer_module.MAX_PIECES = pieces
        cut_ids, cut_ms = tokenizer.encode(text), best_ms(lambda: tokenizer.encode(text), args.repeats)
        results.append({"num_tokens": len(whole_ids), "num_chars": len(text), "whole_ms": whole_ms,
                        "pieces": min(pieces, len(text) // tokenizer_module.MIN_PIECE_CHARS), "pieces_ms": cut_ms,
                        "same_ids": cut_ids == whole_ids})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({**environment(), "tokenizer_dir": args.tokenizer_dir, "cpus": len(os.sched_getaffinity(0)),
                      "cuts_before_spaces": tokenizer.is_cut_before_spaces, "results": results}, indent=1))


if __name__ == "__main__":
    main()
