"""Proposing tokens for speculative decoding: n-gram prompt lookup (TGI's `--speculate N` without
speculator heads).

A request's next tokens often repeat a span of its own prompt or output (code, quotes, rewrites,
summaries of a given text). The proposal is the continuation of the latest earlier occurrence of the
sequence's last `n` tokens, for n from `MAX_NGRAM` down to 1; the shards verify the proposals in one
forward and keep those that agree with what they would have sampled, so a wrong proposal costs
compute, never correctness.
"""

from __future__ import annotations

from array import array

MAX_NGRAM = 3
_ITEM = array("I").itemsize  # bytes per token id in the searched buffer


def propose_ngram(token_ids: list[int], num_tokens: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `num_tokens` tokens that followed the latest earlier occurrence of the last n tokens of
    `token_ids` (the longest n <= `max_ngram` that occurs); [] when none does."""
    if num_tokens <= 0 or len(token_ids) < 2:
        return []
    haystack = array("I", token_ids).tobytes()  # searched in C: a few microseconds for thousands of tokens
    for n in range(min(max_ngram, len(token_ids) - 1), 0, -1):
        needle = haystack[-n * _ITEM:]
        end = len(haystack) - _ITEM  # an occurrence must end before the last token
        while (found := haystack.rfind(needle, 0, end)) >= 0:
            if found % _ITEM == 0:  # aligned on a token, not inside one
                start = found // _ITEM + n
                return token_ids[start:start + num_tokens]
            end = found + len(needle) - 1
    return []
