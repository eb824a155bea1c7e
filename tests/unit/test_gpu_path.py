"""The GPU path end to end in one shard: Triton kernels, CUDA graphs for decode, chunked prefill.

Greedy tokens are checked against HF transformers (fp32, on CPU) teacher-forced: given our tokens so
far, each token we picked is HF's argmax, or within float noise of it where two logits nearly tie
(GPU and CPU sum in different orders, so an exact tie can break either way)."""

import pytest
import torch
from model_helpers import save_tiny_model, tiny_config

from tgi_server.distributed import SINGLE
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.models.registry import load_model
from tgi_server.sampler import SamplingParams
from tgi_server.warmup import warmup

pytestmark = pytest.mark.gpu

BLOCK_SIZE = 16
PROMPTS = [[5, 9, 2], [17] * 40, list(range(3, 80)), [100, 4], [7, 7, 8, 9, 10, 11], list(range(60, 5, -1))]
# Different lengths, so requests leave the batch at different steps.
NEW_TOKENS = [24, 10, 24, 5, 24, 17]


def generate_greedy(
    runner: ModelRunner, prefill_chunk: int, lookahead: bool = False, late_join_step: int = 0,
    sampling: SamplingParams = SamplingParams(),
) -> list[list[int]]:
    """Continuations of PROMPTS (greedy unless `sampling` says otherwise), batched the way the router batches them: prompts prefilled
    `prefill_chunk` tokens a step, the last prompt joining at `late_join_step`, requests finishing at
    their NEW_TOKENS; with `lookahead`, steps where nobody waits to join say so."""
    blocks_per_seq = -(-(max(map(len, PROMPTS)) + max(NEW_TOKENS) + 1) // BLOCK_SIZE)
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    computed = [0] * len(PROMPTS)
    joined, finished, step = set(), [], 0
    while len(joined) < len(PROMPTS) or any(len(outputs[i]) < NEW_TOKENS[i] for i in joined):
        new, scheduled = [], []
        for i, prompt in enumerate(PROMPTS):
            if i not in joined and (i < len(PROMPTS) - 1 or step >= late_join_step):
                joined.add(i)
                new.append(NewSequence(i, prompt, sampling, 0))
                blocks = list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
            elif i in joined and len(outputs[i]) < NEW_TOKENS[i]:
                blocks = []
            else:
                continue
            n = min(prefill_chunk, len(prompt) - computed[i]) if computed[i] < len(prompt) else 1
            samples = computed[i] + n >= len(prompt)
            last_token = samples and len(outputs[i]) + 1 == NEW_TOKENS[i]
            scheduled.append(ScheduledSequence(i, n, blocks, last_token))
            computed[i] += n
        out = runner.step(finished, new, scheduled, lookahead=lookahead and len(joined) == len(PROMPTS))
        finished = []
        for sample in out.samples:
            outputs[sample.request_id].append(sample.token_id)
            if len(outputs[sample.request_id]) == NEW_TOKENS[sample.request_id]:
                finished.append(sample.request_id)
        step += 1
    return outputs


def assert_greedy_under_transformers(hf_model, outputs: list[list[int]], slack: float = 1e-3, exact_share: float = 0.95) -> None:
    """Each token's logit is within `slack` of HF's best; `exact_share` of them are HF's argmax."""
    num_exact = 0
    for prompt, tokens in zip(PROMPTS, outputs):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # [len(tokens), vocab]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert torch.all(chosen >= logits.max(dim=1).values - slack), (prompt, tokens)
        num_exact += sum(a == b for a, b in zip(tokens, logits.argmax(dim=1).tolist()))
    assert num_exact >= exact_share * sum(NEW_TOKENS)  # near ties are rare


def load_runner(variant: str, tmp_path, kv_cache_dtype: torch.dtype | None = None):
    hf_model = save_tiny_model(tiny_config(variant), tmp_path)
    device = torch.device("cuda")
    model, config = load_model(str(tmp_path), SINGLE, torch.float32, device)
    runner = ModelRunner(model, config, SINGLE, device, torch.float32, BLOCK_SIZE, cuda_graph_sizes=(1, 2, 4, 8),
                         kv_cache_dtype=kv_cache_dtype)
    warmup(runner, max_batch_prefill_tokens=256, max_total_tokens=128, max_batch_size=8)
    assert runner.decode_graphs is not None
    return runner, hf_model


@pytest.mark.parametrize("variant", ["llama3_biased", "mistral_windowed", "odd_heads"])
def test_gpu_greedy_with_kernels_and_cuda_graphs_follows_transformers(variant, tmp_path):
    runner, hf_model = load_runner(variant, tmp_path)
    assert_greedy_under_transformers(hf_model, generate_greedy(runner, prefill_chunk=32))


# fp8 rounding moves the tiny random model's logits (best ones 2.4-4.9, runners-up often 0.2 below):
# e4m3 keeps 3 mantissa bits, e5m2 only 2 (measured on an H100: e5m2 chose tokens up to 0.48 below
# the best). A cache read wrongly would pick tokens near the average logit, several below the best.
@pytest.mark.parametrize("kv_cache_dtype, slack, exact_share", [(torch.float8_e4m3fn, 0.25, 0.8), (torch.float8_e5m2, 1.0, 0.5)])
def test_gpu_greedy_over_an_fp8_kv_cache_stays_near_transformers(kv_cache_dtype, slack, exact_share, tmp_path):
    """Kernels, graphs and lookahead over K/V stored in fp8: each token within rounding noise of the
    best one, most of them the best."""
    runner, hf_model = load_runner("llama", tmp_path, kv_cache_dtype)
    assert runner.kv_caches[0].dtype == kv_cache_dtype
    outputs = generate_greedy(runner, prefill_chunk=32, lookahead=True)
    assert_greedy_under_transformers(hf_model, outputs, slack=slack, exact_share=exact_share)


def test_gpu_greedy_with_eager_prefill_follows_transformers(tmp_path):
    """Steps that a mixed graph would pad too much run op by op, through the same kernels."""
    runner, hf_model = load_runner("llama", tmp_path)
    runner.mixed_graphs = None
    assert_greedy_under_transformers(hf_model, generate_greedy(runner, prefill_chunk=32))


def test_lookahead_steps_give_the_same_tokens_as_plain_steps(tmp_path):
    """Requests finishing, a late joiner, chunked prefill: lookahead rows are reused or recomputed."""
    runner, hf_model = load_runner("llama", tmp_path)
    plain = generate_greedy(runner, prefill_chunk=32, late_join_step=6)
    runner.clear()
    with_lookahead = generate_greedy(runner, prefill_chunk=32, lookahead=True, late_join_step=6)
    assert runner.num_lookahead_rows_used > 50
    assert runner.num_chained_steps > 10
    assert with_lookahead == plain
    assert_greedy_under_transformers(hf_model, with_lookahead)


@pytest.mark.parametrize(
    "sampling, chains",
    [
        (SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=7), True),
        (SamplingParams(do_sample=True, repetition_penalty=1.3, seed=7), False),  # reads tokens on the host
    ],
)
def test_lookahead_sampling_gives_the_same_tokens_as_plain_steps(sampling, chains, tmp_path):
    runner, _ = load_runner("llama", tmp_path)
    plain = generate_greedy(runner, prefill_chunk=32, late_join_step=6, sampling=sampling)
    runner.clear()
    with_lookahead = generate_greedy(runner, prefill_chunk=32, lookahead=True, late_join_step=6, sampling=sampling)
    assert with_lookahead == plain
    assert runner.num_lookahead_rows_used > 50
    assert (runner.num_chained_steps > 10) == chains


def test_a_request_at_its_last_token_starts_no_lookahead_row(tmp_path):
    runner, _ = load_runner("llama", tmp_path)
    blocks = list(range(1, 9))
    runner.step([], [NewSequence(1, PROMPTS[0], SamplingParams(), 0)], [ScheduledSequence(1, 3, blocks)], lookahead=True)
    assert runner._lookahead is not None
    runner.step([], [], [ScheduledSequence(1, 1, [], last_token=True)], lookahead=True)
    assert runner._lookahead is None  # the next plan would not decode it: the GPU stays free
