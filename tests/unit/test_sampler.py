"""Batched sampling: HF transformers' logits processors are the oracle for penalties and warpers."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tgi_server.sampler import SamplingBatch, SamplingParams, Watermark, _apply_penalties, _apply_warpers, _uniform, sample

VOCAB = 50


def logits_batch(num_rows, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 3  # [B, V]


def build(params, histories=None):
    histories = histories or [[1, 2, 3]] * len(params)
    return SamplingBatch.build(params, histories, torch.device("cpu"))


def test_greedy_rows_pick_the_argmax():
    logits = logits_batch(4)
    out = sample(logits, build([SamplingParams()] * 4), [0] * 4)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_logprob_and_top_tokens_come_from_the_processed_distribution():
    logits = logits_batch(2)
    out = sample(logits, build([SamplingParams()] * 2), [3, 3])
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids[:, 0].tolist() == out.token_ids.tolist()
    assert torch.allclose(out.top_logprobs, expected.topk(3, -1).values)


def test_seeded_sample_does_not_depend_on_the_rest_of_the_batch():
    logits = logits_batch(1).repeat(3, 1)
    target = SamplingParams(do_sample=True, seed=99)
    alone = sample(logits[:1], build([target], [[4, 5]]), [0]).token_ids.item()
    crowd = [SamplingParams(do_sample=True, seed=1), SamplingParams(do_sample=True, seed=2), target]
    together = sample(logits, build(crowd, [[9], [8, 7, 6], [4, 5]]), [0]).token_ids[2].item()
    assert alone == together


def test_a_given_position_seeds_the_sample_as_a_history_of_that_length_would():
    """A chained decode step samples before the previous token reaches the host."""
    logits = logits_batch(1).repeat(16, 1) / 3  # a flat distribution, so the draws vary
    params = [SamplingParams(do_sample=True, seed=seed) for seed in range(16)]
    full = sample(logits, build(params, [[4, 5, 6]] * 16), [0]).token_ids
    short = sample(logits, SamplingBatch.build(params, [[4, 5]] * 16, torch.device("cpu"), [3] * 16), [0]).token_ids
    other = sample(logits, build(params, [[4, 5]] * 16), [0]).token_ids
    assert torch.equal(full, short)
    assert not torch.equal(full, other)  # the position does change the draw


def test_sampling_frequencies_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    params = [SamplingParams(do_sample=True, seed=s) for s in range(4000)]
    out = sample(logits, SamplingBatch.build(params, [[0]] * 4000, torch.device("cpu")), [0] * 4000)
    frequencies = torch.bincount(out.token_ids, minlength=4).float() / 4000
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.03)


def test_repetition_penalty_matches_transformers():
    logits = logits_batch(2)
    histories = [[1, 2, 3, 3], [4, 10, 20, 30]]
    params = [SamplingParams(repetition_penalty=1.3)] * 2
    ours = _apply_penalties(logits, build(params, histories))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(histories), logits.clone())
    assert torch.allclose(ours, theirs)


def test_frequency_penalty_subtracts_penalty_times_token_share():
    logits = torch.zeros(1, VOCAB)
    ours = _apply_penalties(logits, build([SamplingParams(frequency_penalty=0.5)], [[7, 7, 7, 2]]))
    assert ours[0, 7].item() == pytest.approx(-0.5 * 3 / 4)
    assert ours[0, 2].item() == pytest.approx(-0.5 * 1 / 4)
    assert ours[0, 3].item() == 0.0


@pytest.mark.parametrize(
    "params, warpers",
    [
        (SamplingParams(do_sample=True, temperature=0.7), [TemperatureLogitsWarper(0.7)]),
        (SamplingParams(do_sample=True, top_k=5), [TopKLogitsWarper(5)]),
        (SamplingParams(do_sample=True, top_p=0.8), [TopPLogitsWarper(0.8)]),
        (SamplingParams(do_sample=True, typical_p=0.6), [TypicalLogitsWarper(0.6)]),
        (SamplingParams(do_sample=True, min_p=0.2), [MinPLogitsWarper(0.2)]),
        (
            SamplingParams(do_sample=True, temperature=0.8, top_p=0.95, min_p=0.1, typical_p=0.9),
            [TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.95), MinPLogitsWarper(0.1), TypicalLogitsWarper(0.9)],
        ),
        (
            SamplingParams(do_sample=True, temperature=1.5, top_k=20, top_p=0.9),
            [TemperatureLogitsWarper(1.5), TopKLogitsWarper(20), TopPLogitsWarper(0.9)],
        ),
    ],
)
def test_warpers_keep_the_same_tokens_as_transformers(params, warpers):
    logits = logits_batch(3, seed=5)
    ours = _apply_warpers(logits, build([params] * 3))
    theirs = logits.clone()
    for warper in warpers:
        theirs = warper(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite])


def test_logit_bias_adds_to_those_tokens_as_transformers_sequence_bias_does_greedy_rows_too():
    logits = logits_batch(3, seed=2)
    bias = tuple(sorted(((4, 7.5), (logits[0].argmax().item(), -100.0), (49, 2.0))))  # the best one banned
    params = [SamplingParams(logit_bias=bias), SamplingParams(), SamplingParams(do_sample=True, seed=1, logit_bias=bias[:1])]
    out = sample(logits, build(params), [VOCAB] * 3)
    theirs = SequenceBiasLogitsProcessor({(token,): value for token, value in bias})(torch.tensor([[1]]), logits[:1].clone())
    assert out.token_ids[0].item() == theirs.argmax().item() != logits[0].argmax().item()
    assert torch.allclose(out.top_logprobs[0], theirs.log_softmax(-1)[0].sort(descending=True).values)
    assert out.token_ids[1].item() == logits[1].argmax().item()  # its neighbours' biases leave it alone


def test_the_sampling_noise_is_finite_for_every_random_draw():
    """The largest and smallest draws map strictly inside (0, 1): the Gumbel noise stays finite, so a
    filtered-out token (-inf) can never win the sample."""
    uniform = _uniform(torch.tensor([0, 1, (1 << 23) - 2, (1 << 23) - 1]))
    assert torch.all((uniform > 0) & (uniform < 1))
    assert torch.isfinite(-torch.log(-torch.log(uniform))).all()


def test_a_token_filtered_out_is_never_sampled_even_on_the_extreme_random_draw():
    """Seed 0 at position 452 draws all-ones random bits for token 1004 (found by search): with the
    noise infinite there, top_k=1 sampled that token instead of the most likely one."""
    logits = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = 10.0
    batch = SamplingBatch.build([SamplingParams(do_sample=True, top_k=1, seed=0)], [[1]], torch.device("cpu"), positions=[452])
    assert sample(logits, batch, [0]).token_ids.item() == 7


def test_min_p_of_one_samples_only_the_most_likely_token():
    logits = logits_batch(4, seed=3)
    out = sample(logits, build([SamplingParams(do_sample=True, temperature=5.0, min_p=1.0, seed=s) for s in range(4)]), [0] * 4)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_greedy_rows_are_not_warped_by_their_neighbours_settings():
    logits = logits_batch(2)
    params = [SamplingParams(), SamplingParams(do_sample=True, top_k=1, seed=3)]
    scores = _apply_warpers(logits, build(params))
    assert not torch.isinf(scores[0]).any()
    assert math.isinf(scores[1].sort().values[0].item())


def test_u64_seeds_above_the_int64_range_are_accepted():
    out = sample(logits_batch(1), build([SamplingParams(do_sample=True, seed=2**64 - 1)]), [0])
    assert 0 <= out.token_ids.item() < VOCAB


@pytest.mark.parametrize("watermark", [Watermark(), Watermark(gamma=0.25, delta=3.0)])
def test_watermark_adds_delta_to_tgis_green_list_of_gamma_seeded_by_the_previous_token(watermark):
    logits = logits_batch(2)
    batch = SamplingBatch.build([SamplingParams(), SamplingParams(watermark=True)], [[3], [77]], torch.device("cpu"),
                                watermark=watermark)
    out = sample(logits, batch, [0, 0])
    generator = torch.Generator().manual_seed(15485863 * 77)
    green = torch.randperm(VOCAB, generator=generator)[: int(VOCAB * watermark.gamma)]
    expected = logits[1].clone()
    expected[green] += watermark.delta
    assert out.token_ids.tolist() == [logits[0].argmax().item(), expected.argmax().item()]
    assert out.logprobs[1].item() == pytest.approx(torch.log_softmax(expected, -1).max().item(), abs=1e-5)
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1).max().item(), abs=1e-5)


def test_watermarked_greedy_row_prefers_green_tokens():
    logits = torch.zeros(1, VOCAB)
    out = sample(logits, build([SamplingParams(watermark=True)], [[5]]), [0])
    generator = torch.Generator().manual_seed(15485863 * 5)
    green = set(torch.randperm(VOCAB, generator=generator)[: VOCAB // 2].tolist())
    assert out.token_ids.item() in green


def test_top_tokens_include_ties_with_the_last_one_and_respect_each_rows_n():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    batch = SamplingBatch.build([SamplingParams()] * 2, [[1], [1]], torch.device("cpu"))
    out = sample(logits, batch, [2, 1])
    assert out.top_counts.tolist() == [4, 1]  # row 0: the best, then three tied for second
    assert out.top_ids[0, :4].tolist()[0] == 0 and sorted(out.top_ids[0, 1:4].tolist()) == [1, 2, 3]
    assert out.top_ids[1, :1].tolist() == [0]


def _bitmask(allowed: set[int], vocab: int = VOCAB) -> bytes:
    """The proto's packing: bit t % 32 of little-endian 32-bit word t // 32."""
    words = [0] * ((vocab + 31) // 32)
    for token in allowed:
        words[token // 32] |= 1 << (token % 32)
    return b"".join(word.to_bytes(4, "little") for word in words)


def test_a_grammar_mask_confines_its_row_and_leaves_the_others_alone():
    logits = logits_batch(3)
    allowed = {3, 17, 40, 49}  # across words, including the last id
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=7), SamplingParams()]
    batch = SamplingBatch.build(params, [[1]] * 3, torch.device("cpu"), allowed_tokens=[_bitmask(allowed), _bitmask(allowed), b""])
    out = sample(logits, batch, [VOCAB] * 3)
    masked = torch.full((VOCAB,), float("-inf"))
    masked[list(allowed)] = logits[0, list(allowed)]
    assert out.token_ids[0].item() == masked.argmax().item()
    assert out.token_ids[1].item() in allowed
    assert out.token_ids[2].item() == logits[2].argmax().item()
    assert math.isclose(out.logprobs[0].item(), masked.log_softmax(-1).max().item(), rel_tol=1e-6)
    assert out.top_counts[0].item() == len(allowed)  # the other tokens have probability 0
