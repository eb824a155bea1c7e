"""The GPU path end to end in one shard: Triton kernels, CUDA graphs for decode, chunked prefill.

Greedy tokens are checked against HF transformers (fp32, on CPU) teacher-forced: given our tokens so
far, each token we picked is HF's argmax, or within float noise of it where two logits nearly tie
(GPU and CPU sum in different orders, so an exact tie can break either way)."""

import pytest
import torch
from model_helpers import save_tiny_model, tiny_config
from runner_helpers import (
    BLOCK_SIZE,
    PROMPTS,
    assert_a_cached_prefix_gives_the_tokens_of_a_whole_prompt,
    assert_greedy_under_transformers,
    assert_lookahead_gives_the_plain_tokens,
    assert_verified_proposals_give_the_plain_tokens,
    every_fifth_token,
    generate_greedy,
    generate_with_draft_model,
)

from tgi_server.distributed import SINGLE
from tgi_server.drafter import Drafter
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.models.registry import load_model
from tgi_server.sampler import SamplingParams
from tgi_server.warmup import warmup

pytestmark = pytest.mark.gpu

def load_runner(variant: str, tmp_path, kv_cache_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32,
                quantize: str | None = None):
    hf_model = save_tiny_model(tiny_config(variant), tmp_path)
    return checkpoint_runner(tmp_path, kv_cache_dtype, dtype, quantize), hf_model


def checkpoint_runner(model_dir, kv_cache_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32,
                      quantize: str | None = None, draft_dir=None) -> ModelRunner:
    device = torch.device("cuda")
    model, config = load_model(str(model_dir), SINGLE, dtype, device, quantize=quantize)
    drafter = None
    if draft_dir is not None:
        draft, draft_config = load_model(str(draft_dir), SINGLE, dtype, device)
        drafter = Drafter(draft, draft_config, device, BLOCK_SIZE, kv_cache_dtype or dtype)
    runner = ModelRunner(model, config, SINGLE, device, dtype, BLOCK_SIZE, cuda_graph_sizes=(1, 2, 4, 8),
                         kv_cache_dtype=kv_cache_dtype, drafter=drafter)
    warmup(runner, max_batch_prefill_tokens=256, max_total_tokens=128, max_batch_size=8)
    assert runner.decode_graphs is not None
    return runner


@pytest.mark.parametrize("variant", ["llama3_biased", "mistral_windowed", "odd_heads", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma", "gemma2", "gemma3"])
def test_gpu_greedy_with_kernels_and_cuda_graphs_follows_transformers(variant, tmp_path):
    runner, hf_model = load_runner(variant, tmp_path)
    assert_greedy_under_transformers(hf_model, generate_greedy(runner, prefill_chunk=32))


def test_gpu_portable_ops_run_without_cuda_graphs_and_follow_transformers(tmp_path):
    """--disable-custom-kernels on a GPU: the portable attention cannot replay in a CUDA graph, so the
    runner captures none and its eager steps give transformers' tokens."""
    hf_model = save_tiny_model(tiny_config("llama3_biased"), tmp_path)
    device = torch.device("cuda")
    model, config = load_model(str(tmp_path), SINGLE, torch.float32, device, backend="portable")
    runner = ModelRunner(model, config, SINGLE, device, torch.float32, BLOCK_SIZE, cuda_graph_sizes=(1, 2, 4, 8))
    warmup(runner, max_batch_prefill_tokens=256, max_total_tokens=128, max_batch_size=8)
    assert runner.decode_graphs is None and runner.mixed_graphs is None
    assert_greedy_under_transformers(hf_model, generate_greedy(runner, prefill_chunk=32, lookahead=True))


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


def test_bf16_greedy_with_kernels_graphs_and_lookahead_stays_near_transformers(tmp_path):
    """The GPU default dtype end to end: bfloat16 weights, activations and cache through the kernels,
    CUDA graphs and chained lookahead. bfloat16 keeps 8 mantissa bits, so each token is within its
    rounding of HF's best (fp32) and most are the best."""
    runner, hf_model = load_runner("llama", tmp_path, dtype=torch.bfloat16)
    assert runner.kv_caches[0].dtype == torch.bfloat16
    outputs = generate_greedy(runner, prefill_chunk=32, lookahead=True)
    assert runner.num_chained_steps > 10
    assert_greedy_under_transformers(hf_model, outputs, slack=0.1, exact_share=0.8)


def test_fp8_weights_on_the_tensor_cores_under_graphs_and_lookahead_stay_near_transformers(tmp_path):
    """`--quantize fp8` in bfloat16 through torch._scaled_mm, CUDA graphs and chained lookahead: fp8
    weights and activations move the tiny model's logits by about a tenth of their spread (see
    test_quantization.py), so tokens stay within that of HF's best and most are the best."""
    runner, hf_model = load_runner("llama", tmp_path, dtype=torch.bfloat16, quantize="fp8")
    assert runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    outputs = generate_greedy(runner, prefill_chunk=32, lookahead=True)
    assert_greedy_under_transformers(hf_model, outputs, slack=0.6, exact_share=0.6)


@pytest.mark.parametrize("fmt, slack, exact_share", [("awq", 0.1, 0.8), ("gptq-act-order", 0.1, 0.8), ("ct-w4a16", 0.1, 0.8),
                                                     ("gptq-per-channel", 0.1, 0.8),
                                                     ("ct-fp8-channel", 0.6, 0.6), ("fp8-per-tensor", 0.6, 0.6)])
def test_quantized_checkpoints_under_kernels_graphs_and_lookahead_stay_near_their_dequantized_weights(
    fmt, slack, exact_share, tmp_path
):
    """AWQ, act-order GPTQ, compressed-tensors 4-bit and fp8 checkpoints in bfloat16 through the W4A16
    kernel or the fp8 tensor cores and skinny fp8 kernel, CUDA graphs and chained lookahead: tokens
    within bfloat16's rounding of transformers' on the dequantized weights (fp8: within fp8's, as
    above)."""
    from quantized_checkpoints import save_quantized

    reference = save_quantized(tiny_config("llama"), tmp_path, tmp_path, fmt, weight_std=0.15)
    runner = checkpoint_runner(tmp_path, dtype=torch.bfloat16)
    outputs = generate_greedy(runner, prefill_chunk=32, lookahead=True)
    assert_greedy_under_transformers(reference, outputs, slack=slack, exact_share=exact_share)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=7)],
                         ids=["greedy", "seeded-sampling"])
def test_verifying_proposals_with_kernels_and_mixed_graphs_gives_the_plain_tokens(sampling, tmp_path):
    """Speculative verify steps (several tokens of one request, sampled at each) through the kernels and
    the mixed-step CUDA graphs: the same tokens as one at a time."""
    runner, _ = load_runner("llama", tmp_path)
    assert_verified_proposals_give_the_plain_tokens(runner, sampling)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=7)],
                         ids=["greedy", "seeded-sampling"])
def test_draft_model_proposals_under_kernels_and_graphs_give_the_plain_tokens(sampling, tmp_path):
    """A draft model (the model itself, so its proposals are right) proposing through its own decode
    and mixed-step CUDA graphs: the tokens of plain decoding, and nearly every proposal kept."""
    save_tiny_model(tiny_config("llama"), tmp_path)
    runner = checkpoint_runner(tmp_path, draft_dir=tmp_path)
    assert runner.drafter.decode_graphs is not None and runner.drafter.mixed_graphs is not None
    prompts = PROMPTS[:4]
    plain, _ = generate_with_draft_model(runner, prompts, 16, sampling, 0)
    runner.clear()
    drafted, steps = generate_with_draft_model(runner, prompts, 16, sampling, 3)
    assert drafted == plain
    assert sum(map(len, steps)) <= 1.2 * len(prompts) * (1 + 15 / 4)  # a prompt's token, then 4 a step


def test_gpu_greedy_with_eager_prefill_follows_transformers(tmp_path):
    """Steps that a mixed graph would pad too much run op by op, through the same kernels."""
    runner, hf_model = load_runner("llama", tmp_path)
    runner.mixed_graphs = None
    assert_greedy_under_transformers(hf_model, generate_greedy(runner, prefill_chunk=32))


def test_a_sequence_joining_with_cached_blocks_under_cuda_graphs_decodes_what_its_whole_prompt_gives(tmp_path):
    runner, _ = load_runner("llama", tmp_path)
    assert_a_cached_prefix_gives_the_tokens_of_a_whole_prompt(runner)


def test_lookahead_steps_give_the_same_tokens_as_plain_steps(tmp_path):
    """Requests finishing, a late joiner, chunked prefill: lookahead rows are reused or recomputed."""
    runner, hf_model = load_runner("llama", tmp_path)
    assert_greedy_under_transformers(hf_model, assert_lookahead_gives_the_plain_tokens(runner))


@pytest.mark.parametrize(
    "sampling, chains",
    [
        (SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=7), True),
        (SamplingParams(do_sample=True, repetition_penalty=1.3, seed=7), False),  # reads tokens on the host
    ],
)
def test_lookahead_sampling_gives_the_same_tokens_as_plain_steps(sampling, chains, tmp_path):
    runner, _ = load_runner("llama", tmp_path)
    assert_lookahead_gives_the_plain_tokens(runner, sampling, chains)


def test_grammar_masked_rows_under_cuda_graphs_and_lookahead_pick_the_best_allowed_token(tmp_path):
    """Half the requests under a grammar mask that changes every token, half free, decoded by CUDA
    graphs with lookahead: each token is transformers' best among those allowed."""
    runner, hf_model = load_runner("llama", tmp_path)
    outputs = generate_greedy(runner, prefill_chunk=32, lookahead=True, allowed=every_fifth_token)
    assert_greedy_under_transformers(hf_model, outputs, allowed=every_fifth_token)


def test_a_request_at_its_last_token_starts_no_lookahead_row(tmp_path):
    runner, _ = load_runner("llama", tmp_path)
    blocks = list(range(1, 9))
    runner.step([], [NewSequence(1, PROMPTS[0], SamplingParams(), 0)], [ScheduledSequence(1, 3, blocks)], lookahead=True)
    assert runner.lookahead.started is not None
    runner.step([], [], [ScheduledSequence(1, 1, [], last_token=True)], lookahead=True)
    assert runner.lookahead.started is None  # the next plan would not decode it: the GPU stays free
