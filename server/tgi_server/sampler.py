"""Batched next-token selection: penalties, warpers, greedy or seeded sampling, logprobs, top-n.

Everything is a tensor op over the whole batch (no per-request loop). Sampling uses the Gumbel-max
trick with noise that is a pure function of (seed, position, token id), computed by a counter-based
hash: the same seed gives the same text whatever else is in the batch, on every rank, and after a
preemption recomputes the sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_U64 = 1 << 64
# Below this temperature a row is greedy (sampling's limit as the temperature falls to 0): dividing
# logits by a smaller one overflows float32 (1e-40 would turn every logit into inf and pick id 0).
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    watermark: bool = False
    min_p: float = 0.0  # 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)


@dataclass(frozen=True)
class Watermark:
    """The green list of `watermark` requests (the shard's --watermark-gamma/-delta, as in TGI)."""

    gamma: float = 0.5  # share of the vocabulary on the green list
    delta: float = 2.0  # logit boost of green tokens


@dataclass
class SamplingBatch:
    """Per-row sampling controls as tensors on the logits' device.

    Columns a batch does not use are None (an all-greedy batch without penalties builds no tensor):
    the sampling columns exist when `use_sampling`, the penalty columns when `history` does.
    """

    do_sample: torch.Tensor | None  # [B] bool
    temperature: torch.Tensor | None  # [B] float32
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B] float32, 1 = off
    typical_p: torch.Tensor | None  # [B] float32, 1 = off
    min_p: torch.Tensor | None  # [B] float32, 0 = off
    seed: torch.Tensor | None  # [B] int64 (u64 reinterpreted)
    position: torch.Tensor | None  # [B] int64: index the sampled token will have in its sequence
    repetition_penalty: torch.Tensor | None  # [B] float32, 1 = off
    frequency_penalty: torch.Tensor | None  # [B] float32, 0 = off
    history: torch.Tensor | None  # [B, L] int64 token ids so far, padded by repeating the first id
    history_len: torch.Tensor | None  # [B] int64
    # Rows constrained by a grammar and their allowed tokens, one bit per id (bit t % 32 of word
    # t // 32); None when no row is constrained.
    allowed_rows: torch.Tensor | None  # [R] int64
    allowed_words: torch.Tensor | None  # [R, W] int32
    # logit_bias as (row, token id, bias) triples; None when no row has one.
    bias_rows: torch.Tensor | None  # [N] int64
    bias_ids: torch.Tensor | None  # [N] int64
    bias_values: torch.Tensor | None  # [N] float32
    # Known on the host when the batch is built, so the hot path needs no device sync to skip work.
    use_sampling: bool
    use_top_k_top_p: bool
    use_typical: bool
    use_min_p: bool
    # (row, previous token id) of the rows to watermark.
    watermark_rows: list[tuple[int, int]]
    watermark: Watermark

    @classmethod
    def build(
        cls, params: list[SamplingParams], histories: list[list[int]], device, positions: list[int] | None = None,
        watermark: Watermark = Watermark(), allowed_tokens: list[bytes] | None = None,
    ) -> SamplingBatch:
        """`positions[i]`: the index row i's sampled token will have (default: len(histories[i])).
        `allowed_tokens[i]`: row i's packed bitmask of allowed tokens (the proto's
        `ScheduledRequest.allowed_tokens`), empty for an unconstrained row."""
        params = [_effective(p) for p in params]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        def field(name, dtype):
            return column([getattr(p, name) for p in params], dtype)

        columns = dict.fromkeys(
            ["do_sample", "temperature", "top_k", "top_p", "typical_p", "min_p", "seed", "position",
             "repetition_penalty", "frequency_penalty", "history", "history_len"]
        )
        use_sampling = any(p.do_sample for p in params)
        if use_sampling:
            columns.update(
                do_sample=field("do_sample", torch.bool),
                temperature=field("temperature", torch.float32),
                top_k=field("top_k", torch.int64),
                top_p=field("top_p", torch.float32),
                typical_p=field("typical_p", torch.float32),
                min_p=field("min_p", torch.float32),
                seed=column([p.seed - _U64 if p.seed >= _U64 // 2 else p.seed for p in params], torch.int64),
                position=column(positions or [len(h) for h in histories], torch.int64),
            )
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 for p in params):
            width = max(len(h) for h in histories)
            columns.update(
                repetition_penalty=field("repetition_penalty", torch.float32),
                frequency_penalty=field("frequency_penalty", torch.float32),
                history=column([h + [h[0]] * (width - len(h)) for h in histories], torch.int64),  # [B, L]
                history_len=column([len(h) for h in histories], torch.int64),
            )
        return cls(
            **columns,
            **_allowed_columns(allowed_tokens or [], device),
            **_bias_columns(params, device),
            use_sampling=use_sampling,
            use_top_k_top_p=any(p.do_sample and (p.top_k > 0 or p.top_p < 1.0) for p in params),
            use_typical=any(p.do_sample and p.typical_p < 1.0 for p in params),
            use_min_p=any(p.do_sample and p.min_p > 0.0 for p in params),
            watermark_rows=[(row, h[-1]) for row, (p, h) in enumerate(zip(params, histories)) if p.watermark],
            watermark=watermark,
        )


def _allowed_columns(allowed_tokens: list[bytes], device) -> dict[str, torch.Tensor | None]:
    """SamplingBatch's grammar columns: the constrained rows and their masks as int32 words."""
    masks = [(row, mask) for row, mask in enumerate(allowed_tokens) if mask]
    if not masks:
        return {"allowed_rows": None, "allowed_words": None}
    width = max(len(mask) for _, mask in masks)
    packed = b"".join(mask.ljust(width, b"\0") for _, mask in masks)  # missing words: nothing allowed
    words = torch.frombuffer(bytearray(packed), dtype=torch.int32).view(len(masks), width // 4)
    rows = torch.tensor([row for row, _ in masks], dtype=torch.int64, device=device)
    return {"allowed_rows": rows, "allowed_words": words.to(device)}


def _bias_columns(params: list[SamplingParams], device) -> dict[str, torch.Tensor | None]:
    """SamplingBatch's logit_bias columns: one (row, token id, bias) triple per entry."""
    bias = [(row, token_id, value) for row, p in enumerate(params) for token_id, value in p.logit_bias]
    if not bias:
        return {"bias_rows": None, "bias_ids": None, "bias_values": None}
    rows, ids, values = zip(*bias)
    return {
        "bias_rows": torch.tensor(rows, dtype=torch.int64, device=device),
        "bias_ids": torch.tensor(ids, dtype=torch.int64, device=device),
        "bias_values": torch.tensor(values, dtype=torch.float32, device=device),
    }


def _effective(params: SamplingParams) -> SamplingParams:
    if params.do_sample and params.temperature < MIN_SAMPLING_TEMPERATURE:
        return dataclasses.replace(params, do_sample=False)
    return params


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32
    top_ids: torch.Tensor  # [B, K] int64, most likely first
    top_logprobs: torch.Tensor  # [B, K] float32
    top_counts: torch.Tensor  # [B] int64: how many of the K columns belong to each row


def copy_to_host(output: SamplerOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts copying the sampled ids and logprobs to (pinned, from CUDA) host memory; read them
    after a sync."""
    pin = output.token_ids.device.type == "cuda"
    token_ids = torch.empty(output.token_ids.shape, dtype=torch.int64, pin_memory=pin)
    logprobs = torch.empty(output.logprobs.shape, dtype=torch.float32, pin_memory=pin)
    token_ids.copy_(output.token_ids, non_blocking=True)
    logprobs.copy_(output.logprobs, non_blocking=True)
    return token_ids, logprobs


def sample(logits: torch.Tensor, batch: SamplingBatch, top_n: list[int]) -> SamplerOutput:
    """Picks one token per row of `logits` [B, V] (float32). Reported logprobs are those of the
    processed distribution (after penalties and warpers), as TGI reports them. Row i also gets its
    `top_n[i]` most likely tokens, plus any tied with the last of them (as TGI returns them)."""
    scores = logits.float()
    if batch.bias_rows is not None:
        scores = scores.index_put((batch.bias_rows, batch.bias_ids), batch.bias_values, accumulate=True)
    if batch.allowed_rows is not None:
        scores = _apply_allowed(scores, batch.allowed_rows, batch.allowed_words)
    scores = _apply_watermark(scores, batch.watermark_rows, batch.watermark)
    scores = _apply_penalties(scores, batch)
    scores = _apply_warpers(scores, batch)
    logprobs = torch.log_softmax(scores, dim=-1)  # [B, V]
    token_ids = torch.argmax(scores, dim=-1)  # greedy
    if batch.use_sampling:
        sampled_ids = torch.argmax(logprobs + _gumbel_noise(batch.seed, batch.position, scores.shape[1]), dim=-1)
        token_ids = torch.where(batch.do_sample, sampled_ids, token_ids)
    token_logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    top_ids, top_logprobs, top_counts = _top_tokens(logprobs, top_n)
    return SamplerOutput(token_ids, token_logprobs, top_ids, top_logprobs, top_counts)


def _apply_allowed(scores: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """-inf for every token the bitmask of a constrained row does not allow (on the device)."""
    vocab_size = scores.shape[1]
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = ((words[:, :, None] >> shifts) & 1).flatten(1).bool()  # [R, 32 * W]
    if bits.shape[1] < vocab_size:
        bits = torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
    scores = scores.clone()
    scores[rows] = scores[rows].masked_fill(~bits[:, :vocab_size], float("-inf"))
    return scores


def _top_tokens(logprobs: torch.Tensor, top_n: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows = logprobs.shape[0]
    if not any(top_n):
        empty = logprobs.new_zeros((num_rows, 0))
        return empty.long(), empty, torch.zeros(num_rows, dtype=torch.int64, device=logprobs.device)
    n = torch.tensor(top_n, device=logprobs.device)  # [B]
    values = torch.topk(logprobs, k=max(top_n), dim=-1).values
    nth = values.gather(1, (n - 1).clamp(min=0)[:, None])  # [B, 1]: the n-th best logprob of each row
    is_kept = (logprobs >= nth) & torch.isfinite(logprobs)
    counts = torch.where(n > 0, is_kept.sum(dim=-1), 0)  # [B]
    # One host sync for the widest row; only requests asking for top tokens pay for it.
    top_logprobs, top_ids = torch.topk(logprobs, k=int(counts.max()), dim=-1)
    return top_ids, top_logprobs, counts


_WATERMARK_HASH_KEY = 15485863


def _apply_watermark(scores: torch.Tensor, rows: list[tuple[int, int]], watermark: Watermark) -> torch.Tensor:
    """Kirchenbauer et al.'s green list, drawn as TGI draws it, so TGI's detectors recognise it.

    One randperm per watermarked row: a rare option, kept out of the common path.
    """
    if not rows:
        return scores
    scores = scores.clone()
    vocab_size = scores.shape[1]
    num_green = int(watermark.gamma * vocab_size)
    for row, previous_token in rows:
        generator = torch.Generator(device=scores.device).manual_seed(_WATERMARK_HASH_KEY * previous_token)
        green = torch.randperm(vocab_size, generator=generator, device=scores.device)[:num_green]
        scores[row, green] += watermark.delta
    return scores


def _apply_penalties(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.history is None:
        return scores
    seen = scores.gather(1, batch.history)  # [B, L]
    penalty = batch.repetition_penalty[:, None]
    scores = scores.scatter(1, batch.history, torch.where(seen > 0, seen / penalty, seen * penalty))
    counts = torch.zeros_like(scores).scatter_add_(1, batch.history, _history_mask(batch))  # [B, V]
    frequency = counts / batch.history_len[:, None].to(scores.dtype)
    return scores - batch.frequency_penalty[:, None] * frequency


def _history_mask(batch: SamplingBatch) -> torch.Tensor:
    columns = torch.arange(batch.history.shape[1], device=batch.history.device)
    return (columns[None, :] < batch.history_len[:, None]).float()  # [B, L]


def _apply_warpers(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if not batch.use_sampling:  # greedy rows ignore every warper
        return scores
    temperature = torch.where(batch.do_sample & (batch.temperature > 0), batch.temperature, 1.0)
    scores = scores / temperature[:, None]
    if batch.use_top_k_top_p:
        top_k = torch.where(batch.do_sample, batch.top_k, 0)
        top_p = torch.where(batch.do_sample, batch.top_p, 1.0)
        scores = _top_k_top_p(scores, top_k, top_p)
    if batch.use_min_p:
        scores = _min_p(scores, torch.where(batch.do_sample, batch.min_p, 0.0))
    if batch.use_typical:
        scores = _typical(scores, torch.where(batch.do_sample, batch.typical_p, 1.0))
    return scores


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(scores.shape[1], device=scores.device)[None, :]
    k = torch.where(top_k > 0, top_k, scores.shape[1])[:, None]
    sorted_scores = sorted_scores.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    # Keep tokens until the mass before them reaches top_p; the most likely token always stays.
    drop = (mass_before >= top_p[:, None]) & (ranks > 0)
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)


def _min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops the tokens less likely than min_p times the most likely one (which always stays)."""
    probs = torch.softmax(scores, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return scores.masked_fill(probs < threshold, float("-inf"))


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    logprobs = torch.log_softmax(scores, dim=-1)
    probs = logprobs.exp()
    entropy = -torch.nansum(probs * logprobs, dim=-1, keepdim=True)
    surprise_gap = (-logprobs - entropy).abs()  # [B, V]
    sorted_gap, order = torch.sort(surprise_gap, dim=-1)
    sorted_probs = probs.gather(1, order)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Keep the smallest set of most typical tokens whose mass reaches `mass` (at least one).
    num_keep = (cumulative < mass[:, None]).sum(dim=-1, keepdim=True).clamp(max=scores.shape[1] - 1)
    threshold = sorted_gap.gather(1, num_keep)
    drop = (surprise_gap > threshold) & (mass[:, None] < 1.0)
    return scores.masked_fill(drop, float("-inf"))


def _gumbel_noise(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V], a pure function of (seed, position, token id)."""
    token = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    key = _mix(seed[:, None] * -7046029254386353131 + position[:, None]) + token[None, :]  # [B, V]
    return -torch.log(-torch.log(_uniform(_shift_right(_mix(key), 41))))  # 23 uniform bits


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """23 random bits as a float32 strictly inside (0, 1): (bits + 0.5) / 2^23 is exact there. With
    24 bits, 2^24 - 0.5 rounds to 2^24: the noise became +inf, which won the sample whatever the
    token's probability (and gave NaN, which argmax also picks, for a token that was filtered out)."""
    return (bits.float() + 0.5) / float(1 << 23)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps like uint64)."""
    x = x ^ _shift_right(x, 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ _shift_right(x, 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ _shift_right(x, 31)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)
