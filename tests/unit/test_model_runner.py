"""The shard's runner on a tiny random Llama: plans in, samples and prompt logprobs out, checked
against HF transformers."""

import pytest
import torch
from model_helpers import hf_logits, save_tiny_model, tiny_config
from runner_helpers import (
    assert_a_cached_prefix_gives_the_tokens_of_a_whole_prompt, assert_verified_proposals_give_the_plain_tokens,
    generate_with_draft_model,
)

from tgi_server.distributed import SINGLE
from tgi_server.drafter import Drafter
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.models.registry import load_model
from tgi_server.sampler import SamplingParams

BLOCK_SIZE = 4


def make_runner(tmp_path):
    hf_model = save_tiny_model(tiny_config("llama"), tmp_path)
    model, config = load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, config, SINGLE, torch.device("cpu"), torch.float32, BLOCK_SIZE)
    runner.allocate_kv_cache(32)
    return runner, hf_model


def test_prompt_logprobs_over_chunked_prefill_match_transformers(tmp_path):
    runner, hf_model = make_runner(tmp_path)
    prompt = [3, 17, 42, 8, 99, 5, 23]
    new = [NewSequence(1, prompt, SamplingParams(), 0, wants_prompt_logprobs=True)]
    first = runner.step([], new, [ScheduledSequence(1, 3, [7])])
    second = runner.step([], [], [ScheduledSequence(1, 4, [2])])
    got = {}
    for chunk in first.prompt_logprobs + second.prompt_logprobs:
        for i, logprob in enumerate(chunk.logprobs):
            got[chunk.start + i] = logprob
    expected = torch.log_softmax(hf_logits(hf_model, prompt), dim=-1)
    assert sorted(got) == list(range(1, len(prompt)))
    for position, logprob in got.items():
        assert abs(logprob - expected[position - 1, prompt[position]].item()) < 1e-4
    assert first.samples == [] and len(second.samples) == 1


def test_greedy_samples_follow_transformers_and_requests_without_logprobs_get_none(tmp_path):
    runner, hf_model = make_runner(tmp_path)
    prompt = [11, 12, 13, 14, 15]
    out = runner.step([], [NewSequence(4, prompt, SamplingParams(), 2)], [ScheduledSequence(4, 5, [1, 2])])
    ((sample,),) = [s.tokens for s in out.samples]
    assert out.prompt_logprobs == []
    assert sample.token_id == hf_logits(hf_model, prompt)[-1].argmax().item()
    assert [t for t, _ in sample.top_tokens][0] == sample.token_id and len(sample.top_tokens) == 2


def test_a_sequence_joining_with_cached_blocks_decodes_what_its_whole_prompt_gives(tmp_path):
    runner, _ = make_runner(tmp_path)
    assert_a_cached_prefix_gives_the_tokens_of_a_whole_prompt(runner)


@pytest.mark.parametrize("num_cached", [3, 8])
def test_a_cached_prefix_that_is_not_whole_blocks_short_of_the_prompt_is_refused(tmp_path, num_cached):
    runner, _ = make_runner(tmp_path)
    new = [NewSequence(1, list(range(3, 11)), SamplingParams(), 0, num_cached_tokens=num_cached)]
    with pytest.raises(ValueError, match=f"{num_cached} cached tokens of 8"):
        runner.step([], new, [ScheduledSequence(1, 8 - num_cached, [1, 2])])


def test_lookahead_plans_without_cuda_graphs_run_as_plain_steps(tmp_path):
    """Only CUDA graphs start steps early; elsewhere the hint changes nothing."""
    runner, hf_model = make_runner(tmp_path)
    prompt = [11, 12, 13, 14, 15]
    tokens = [runner.step([], [NewSequence(4, prompt, SamplingParams(), 0)], [ScheduledSequence(4, 5, [1, 2])], lookahead=True)]
    tokens.append(runner.step([], [], [ScheduledSequence(4, 1, [])], lookahead=True))
    tokens.append(runner.step([], [], [ScheduledSequence(4, 1, [], last_token=True)], lookahead=True))
    ids = [out.samples[0].tokens[0].token_id for out in tokens]
    expected = []
    for _ in range(3):
        expected.append(hf_logits(hf_model, prompt + expected)[-1].argmax().item())
    assert ids == expected


def test_mixed_step_buckets_are_powers_of_two_then_at_most_512_apart():
    from tgi_server.cuda_graphs import token_buckets

    assert token_buckets(100) == [64, 100]
    assert token_buckets(4096) == [64, 128, 256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]
    large = token_buckets(32768)
    assert large[-1] == 32768 and len(large) <= 4 + 17


@pytest.mark.parametrize("kv_dtype, tolerance", [(torch.float8_e4m3fn, 0.15), (torch.float8_e5m2, 0.4)])
def test_an_fp8_kv_cache_takes_a_byte_per_value_and_keeps_prompt_logprobs_close(tmp_path, kv_dtype, tolerance):
    """Attention reads every key and value, the chunk's own included, as stored in fp8."""
    save_tiny_model(tiny_config("llama"), tmp_path)
    model, config = load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"))
    prompt = [3, 17, 42, 8, 99, 5, 23, 11, 64, 2, 9, 31]
    logprobs, bytes_per_block = [], []
    for cache_dtype in (None, kv_dtype):
        runner = ModelRunner(model, config, SINGLE, torch.device("cpu"), torch.float32, BLOCK_SIZE, kv_cache_dtype=cache_dtype)
        runner.allocate_kv_cache(32)
        first = runner.step([], [NewSequence(1, prompt, SamplingParams(), 0, wants_prompt_logprobs=True)],
                            [ScheduledSequence(1, 6, [7, 8])])
        second = runner.step([], [], [ScheduledSequence(1, 6, [2, 3])])
        logprobs.append([x for chunk in first.prompt_logprobs + second.prompt_logprobs for x in chunk.logprobs])
        bytes_per_block.append(runner.kv_cache_bytes_per_block())
        assert runner.kv_caches[0].dtype == (cache_dtype or torch.float32)
    assert bytes_per_block[1] * 4 == bytes_per_block[0]  # fp32 -> one byte
    assert len(logprobs[1]) == len(prompt) - 1
    assert 0 < max(abs(a - b) for a, b in zip(*logprobs)) < tolerance


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=7, repetition_penalty=1.3),
], ids=["greedy", "seeded-sampling"])
def test_verifying_proposed_tokens_returns_what_one_token_at_a_time_gives(tmp_path, sampling):
    runner, _ = make_runner(tmp_path)
    assert_verified_proposals_give_the_plain_tokens(runner, sampling)


class _DraftFromScratch(Drafter):
    """A reference: the draft recomputes every sequence's cache before proposing."""

    def propose(self, rows):
        for seq, _ in rows:
            seq.num_draft_computed = 0
        return super().propose(rows)


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=7, repetition_penalty=1.3),
], ids=["greedy", "seeded-sampling"])
def test_draft_model_proposals_leave_the_tokens_of_one_at_a_time_decoding(tmp_path, sampling):
    """A draft model proposes 3 tokens a step; the target keeps what it would have sampled. The draft
    being the target itself, every proposal is kept (its cache and noise match the target's); a
    perturbed copy of the target has some proposals kept, the same as when its cache is recomputed
    from scratch every step (what it computed for rejected proposals is not reused); the tokens are
    the plain ones either way."""
    prompts, num_new, k = [[11, 12, 13, 14, 15], list(range(30, 52)), [7]], 12, 3
    save_tiny_model(tiny_config("llama"), tmp_path / "target")
    near = save_tiny_model(tiny_config("llama"), tmp_path / "near")
    with torch.no_grad():
        for parameter in near.parameters():
            parameter.add_(0.03 * torch.randn_like(parameter))
    near.save_pretrained(tmp_path / "near")

    def runner_with(draft_dir, drafter_type=Drafter):
        model, config = load_model(str(tmp_path / "target"), SINGLE, torch.float32, torch.device("cpu"))
        drafter = None
        if draft_dir is not None:
            draft, draft_config = load_model(str(tmp_path / draft_dir), SINGLE, torch.float32, torch.device("cpu"))
            drafter = drafter_type(draft, draft_config, torch.device("cpu"), BLOCK_SIZE, torch.float32)
        runner = ModelRunner(model, config, SINGLE, torch.device("cpu"), torch.float32, BLOCK_SIZE, drafter=drafter)
        runner.allocate_kv_cache(40)
        return runner

    plain, _ = generate_with_draft_model(runner_with(None), prompts, num_new, sampling, 0)
    itself, steps = generate_with_draft_model(runner_with("target"), prompts, num_new, sampling, k)
    near, near_steps = generate_with_draft_model(runner_with("near"), prompts, num_new, sampling, k)
    _, reference_steps = generate_with_draft_model(runner_with("near", _DraftFromScratch), prompts, num_new, sampling, k)
    assert itself == near == plain
    assert steps == [[1, 4, 4, 3]] * len(prompts)  # the prompt's token, then every proposal and one more
    assert near_steps == reference_steps
    assert sum(map(len, steps)) < sum(map(len, near_steps)) < len(prompts) * num_new
