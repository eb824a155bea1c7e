"""The runner's lookahead and chained decode steps on CPU: the decode graphs replaced by a stand-in
that runs the same steps op by op (`runner_helpers.EagerDecodeSteps`), so the bookkeeping (which
started rows are reused, which recomputed, when a step chains) is checked without a GPU. The GPU
suite runs the same scenarios with real CUDA graphs (tests/unit/test_gpu_path.py)."""

import pytest
import torch
from model_helpers import save_tiny_model, tiny_config
from runner_helpers import (
    PROMPTS,
    assert_greedy_under_transformers,
    assert_lookahead_gives_the_plain_tokens,
    every_fifth_token,
    generate_greedy,
    with_eager_decode_steps,
)

from tgi_server.distributed import SINGLE
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.models.registry import load_model
from tgi_server.sampler import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lookahead")
    hf_model = save_tiny_model(tiny_config("llama"), path)
    return path, hf_model


def cpu_runner(model_dir) -> ModelRunner:
    model, config = load_model(str(model_dir), SINGLE, torch.float32, CPU)
    return with_eager_decode_steps(ModelRunner(model, config, SINGLE, CPU, torch.float32, 16), num_blocks=64)


def test_lookahead_and_chained_steps_give_the_plain_steps_tokens(model_dir):
    """Requests finishing, a late joiner, chunked prefill: started rows are reused or recomputed."""
    path, hf_model = model_dir
    with_lookahead = assert_lookahead_gives_the_plain_tokens(cpu_runner(path))
    assert_greedy_under_transformers(hf_model, with_lookahead, slack=1e-4, exact_share=1.0)


@pytest.mark.parametrize(
    "sampling, chains",
    [
        (SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=7), True),
        (SamplingParams(do_sample=True, repetition_penalty=1.3, seed=7), False),  # reads tokens on the host
        (SamplingParams(watermark=True), False),
    ],
)
def test_lookahead_sampling_gives_the_plain_steps_tokens(model_dir, sampling, chains):
    assert_lookahead_gives_the_plain_tokens(cpu_runner(model_dir[0]), sampling, chains)


@pytest.mark.parametrize("lookahead", [False, True])
def test_grammar_masked_rows_pick_the_best_allowed_token_beside_free_rows(model_dir, lookahead):
    """Half the requests sample under a mask that changes every token (usually excluding the free
    best token), half without: each token is transformers' best among those allowed. With lookahead,
    a started row sampled without its mask is recomputed, never served."""
    path, hf_model = model_dir
    runner = cpu_runner(path)
    outputs = generate_greedy(runner, prefill_chunk=32, lookahead=lookahead, allowed=every_fifth_token)
    assert_greedy_under_transformers(hf_model, outputs, slack=1e-4, exact_share=1.0, allowed=every_fifth_token)
    assert any(token % 5 != (0 + k) % 5 for k, token in enumerate(generate_greedy(cpu_runner(path), 32)[0]))


def test_a_request_at_its_last_token_starts_no_lookahead_row(model_dir):
    runner = cpu_runner(model_dir[0])
    blocks = list(range(1, 9))
    runner.step([], [NewSequence(1, PROMPTS[0], SamplingParams(), 0)], [ScheduledSequence(1, 3, blocks)], lookahead=True)
    assert runner.lookahead.started is not None
    runner.step([], [], [ScheduledSequence(1, 1, [], last_token=True)], lookahead=True)
    assert runner.lookahead.started is None  # the next plan would not decode it


def test_a_plan_that_differs_from_the_started_step_recomputes_its_rows(model_dir):
    """A started row whose sequence changed (here: preempted and resent) is not reused."""
    runner = cpu_runner(model_dir[0])
    sampling = SamplingParams()
    runner.step([], [NewSequence(1, PROMPTS[4], sampling, 0)], [ScheduledSequence(1, 6, list(range(1, 9)))], lookahead=True)
    started = runner.lookahead.started
    assert started is not None
    # The router preempted request 1 and sends it again from scratch under a new id.
    out = runner.step([1], [NewSequence(2, PROMPTS[4], sampling, 0)], [ScheduledSequence(2, 6, list(range(9, 17)))], lookahead=True)
    assert runner.num_lookahead_rows_used == 0 and len(out.samples) == 1
