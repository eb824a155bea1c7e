"""The Triton kernels of the GPU path compute what the portable PyTorch layers compute.

On a GPU the kernels run natively; without one, on CPU through Triton's interpreter
(TRITON_INTERPRET=1), so CI checks their arithmetic. fp32 agrees to float rounding, bf16 to two
rounding steps (the interpreter truncates where GPUs round).
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 set before triton is imported (conftest.py)", allow_module_level=True)


from model_helpers import PagedBatchDriver, mixed_schedule, run_schedule, save_tiny_model, tiny_config  # noqa: E402
from tgi_server.distributed import TPGroup  # noqa: E402
from tgi_server.attention_metadata import AttentionMetadata, KVCacheSpec  # noqa: E402
from tgi_server.layers.rotary import RotaryEmbedding  # noqa: E402
from tgi_server.ops import portable  # noqa: E402
from tgi_server.models.registry import load_model  # noqa: E402

CPU = torch.device("cpu")
DEVICE = torch.device("cuda") if torch.cuda.is_available() else CPU


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _metadata(q_lens: list[int], context_lens: list[int], block_size: int, num_blocks: int, generator):
    """Random block tables (block 0 left as padding) for sequences with cached context + new tokens."""
    seq_lens = [c + q for c, q in zip(context_lens, q_lens)]
    pages = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables, slots = [], []
    for context, seq_len in zip(context_lens, seq_lens):
        count = -(-seq_len // block_size)
        table, pages = pages[:count], pages[count:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(context, seq_len)]
    width = max(len(t) for t in tables)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    block_tables = [t + [0] * (width - len(t)) for t in tables]
    return AttentionMetadata.from_host(slots, starts, seq_lens, block_tables, DEVICE)


@pytest.mark.parametrize(
    "q_lens, context_lens, window, softcap",
    [
        ([5, 1, 20], [0, 30, 17], None, None),  # prefill, decode and a chunked-prefill continuation
        ([1, 1, 1], [50, 3, 0], None, None),  # decode only: keys split over several programs
        ([1, 1], [300, 90], 40, None),  # split decode with a sliding window
        ([33], [0], 8, None),  # sliding window inside one prefill
        ([3, 1], [40, 70], 20, None),  # sliding window over cached context
        ([5, 1, 20], [0, 30, 17], None, 2.0),  # soft-capped scores (Gemma 2), prefill and decode
        ([1, 1], [300, 90], 40, 3.0),  # soft-capped split decode with a window
    ],
)
def test_paged_attention_kernel_matches_portable_attention(q_lens, context_lens, window, softcap):
    from tgi_server.kernels.attention import paged_attention

    generator = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 64, 16
    attn = _metadata(q_lens, context_lens, block_size, 40, generator)
    kv_cache = torch.randn(2, 40, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    rotary = RotaryEmbedding(tiny_config("llama"), head_dim, DEVICE)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(context_lens, q_lens)]).to(DEVICE)
    spec = KVCacheSpec(num_kv_heads, head_dim, window, 0.3, softcap)
    expected = portable.attention(q.clone(), k, v, positions, rotary, kv_cache, attn, spec)  # writes the new K/V

    out = paged_attention(rotary(positions, q, k)[0], kv_cache, attn, spec.scale, window, softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_paged_attention_kernel_reads_an_fp8_cache_as_the_portable_path_does(kv_dtype, q_dtype):
    """Prefill, decode and a chunked-prefill continuation over fp8 K/V: both paths widen the same
    fp8 values (the kernel's bfloat16 products run in float16)."""
    from tgi_server.kernels.attention import paged_attention

    generator = torch.Generator().manual_seed(0)
    q_lens, context_lens = [5, 1, 20], [0, 30, 17]
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 64, 16
    attn = _metadata(q_lens, context_lens, block_size, 40, generator)
    kv_cache = torch.randn(2, 40, block_size, num_kv_heads, head_dim, generator=generator).to(kv_dtype).to(DEVICE)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator).to(DEVICE)
    spec = KVCacheSpec(num_kv_heads, head_dim, None, head_dim**-0.5)
    expected = torch.cat([
        portable.attend(q[attn.query_start_loc_cpu[i] : attn.query_start_loc_cpu[i + 1]],
                        portable.gather_context(kv_cache, attn.block_tables[i], seq_len).float(), spec)
        for i, seq_len in enumerate(attn.seq_lens_cpu)
    ])
    out = paged_attention(q.to(q_dtype), kv_cache, attn, spec.scale, None)
    tolerance = 2e-6 if q_dtype == torch.float32 else 2e-2  # bfloat16 queries and output
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_lens, context_lens",
    [
        ([5, 1, 20], [0, 30, 17]),  # prefill, decode and a chunked-prefill continuation
        ([1, 1, 1], [50, 3, 700]),  # decode only: keys split over several programs
        ([300], [0]),  # one long prefill: several query blocks
        ([1] * 8 + [64], [100] * 8 + [40]),  # a prompt chunk riding along decodes (a mixed step)
    ],
)
def test_bf16_paged_attention_kernel_matches_the_float32_reference(q_lens, context_lens):
    """The GPU default: bfloat16 queries and cache. Needs a GPU (Triton's interpreter computes bf16
    `tl.dot` wrongly). The reference attends in float32 over the same bfloat16 values."""
    from tgi_server.kernels.attention import paged_attention

    generator = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 128, 16, 120
    attn = _metadata(q_lens, context_lens, block_size, num_blocks, generator)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(*shape, generator=generator).to(torch.bfloat16).to(DEVICE)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator).to(torch.bfloat16).to(DEVICE)
    spec = KVCacheSpec(num_kv_heads, head_dim, None, head_dim**-0.5)
    expected = torch.cat([
        portable.attend(q[attn.query_start_loc_cpu[i] : attn.query_start_loc_cpu[i + 1]].float(),
                        portable.gather_context(kv_cache, attn.block_tables[i], seq_len).float(), spec)
        for i, seq_len in enumerate(attn.seq_lens_cpu)
    ])
    out = paged_attention(q, kv_cache, attn, spec.scale, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])  # Llama's w, Gemma's 1 + w
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_portable_norm(dtype, weight_offset):
    from tgi_server.kernels.fused import rms_norm

    generator = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 5, 96, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(96, generator=generator).to(DEVICE, dtype)
    out, total = rms_norm(x, weight, 1e-5, residual, weight_offset)
    expected, expected_total = portable.rms_norm(x, weight, 1e-5, residual, weight_offset)
    tolerance = {} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 2**-6}
    torch.testing.assert_close(total, expected_total, **tolerance)
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5, None, weight_offset)[0],
                               portable.rms_norm(x, weight, 1e-5, None, weight_offset)[0], **tolerance)


@pytest.mark.parametrize("activation, reference", [
    ("silu", F.silu), ("gelu_tanh", lambda gate: F.gelu(gate, approximate="tanh")),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_kernel_matches_swiglu_and_geglu(dtype, activation, reference):
    from tgi_server.kernels.fused import gated_activation

    x = 3 * torch.randn(7, 2 * 1100, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2**-6}
    torch.testing.assert_close(gated_activation(x, activation), reference(gate) * up, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3, 6])
def test_skinny_linear_kernel_matches_linear(num_rows, dtype):
    """Ragged edges on every axis: N and K not multiples of the tiles, M not a power of two."""
    from tgi_server.kernels.skinny import skinny_linear

    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, 1000, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(37, 1000, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(37, generator=generator).to(DEVICE, dtype)
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.2, "rtol": 2**-7}
    torch.testing.assert_close(skinny_linear(x, weight), F.linear(x, weight), **tolerance)
    torch.testing.assert_close(skinny_linear(x, weight, bias, config=(8, 256, 4)), F.linear(x, weight, bias), **tolerance)


@pytest.mark.parametrize("cache_dtype", [
    torch.float32,
    pytest.param(torch.float8_e4m3fn, marks=pytest.mark.skipif(
        DEVICE.type != "cuda", reason="Triton 3.6's interpreter rounds float32 to fp8 wrongly below powers of two (-1.98 -> -1.0)")),
])
@pytest.mark.parametrize("num_tokens", [9, 70])  # a few tokens: heads in blocks of 4; many: all in one
@pytest.mark.parametrize("rotary_fraction, qk_norm_offset", [
    (1.0, None),
    (0.75, None),  # Phi-4-mini's partial rotary
    (1.0, 0.0),  # Qwen3's QK-norm, fused before the rotation
    (1.0, 1.0),  # Gemma 3's, scaled by 1 + w
])
def test_rotary_kernel_rotates_q_in_place_and_writes_rotated_k_and_v_to_the_cache(
    num_tokens, cache_dtype, rotary_fraction, qk_norm_offset
):
    from tgi_server.kernels.fused import rotary_and_write_cache
    from tgi_server.layers.norm import RMSNorm

    generator = torch.Generator().manual_seed(0)
    head_dim = 16
    config = tiny_config("llama")
    config.rope_parameters["partial_rotary_factor"] = rotary_fraction
    rotary = RotaryEmbedding(config, head_dim, DEVICE)
    assert rotary.inv_freq.shape[0] == int(head_dim * rotary_fraction) // 2
    qkv = torch.randn(num_tokens, (6 + 2 + 2) * head_dim, generator=generator).to(DEVICE)  # one fused projection
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split([6 * head_dim, 2 * head_dim, 2 * head_dim], -1))
    positions = torch.randint(0, 500, (num_tokens,), generator=generator).to(DEVICE)
    slots = torch.randperm(80, generator=generator)[:num_tokens].to(DEVICE)
    qk_norm = None
    expected_q, expected_k = q, k
    if qk_norm_offset is not None:
        qk_norm = tuple(RMSNorm(head_dim, 1e-6, torch.float32, DEVICE, qk_norm_offset) for _ in range(2))
        for norm in qk_norm:
            norm.weight.copy_(torch.rand(head_dim, generator=generator) + 0.5)
        expected_q, expected_k = (  # the portable norm, row by row
            portable.rms_norm(x.reshape(-1, head_dim), norm.weight, norm.eps, None, norm.weight_offset)[0].view(x.shape)
            for x, norm in zip((q, k), qk_norm)
        )
    expected_q, expected_k = rotary(positions, expected_q, expected_k)
    expected_cache = torch.zeros(2, 20, 4, 2, head_dim, device=DEVICE, dtype=cache_dtype)
    portable.write_kv_cache(expected_cache, expected_k, v, slots)

    cache = torch.zeros(2, 20, 4, 2, head_dim, device=DEVICE, dtype=cache_dtype)
    rotary_and_write_cache(q, k, v, positions, rotary.inv_freq, rotary.attention_scaling, cache, slots, qk_norm)
    torch.testing.assert_close(q, expected_q)
    # fp8 (3 mantissa bits): one rounding step apart at most.
    tolerance = dict(rtol=0.13, atol=2**-9) if cache_dtype.itemsize == 1 else {}
    torch.testing.assert_close(cache.float(), expected_cache.float(), **tolerance)


# Two families between them take every kernel (windowed and soft-capped attention, GeGLU, 1 + w norms,
# qk norms, the MoE router and experts); each kernel's own tests cover the rest of its cases, and the
# GPU runs every family (test_gpu_path.py). Whole models under the interpreter take half a minute each.
@pytest.mark.parametrize("variant", ["gemma2", "qwen3_moe"])
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's check; on a GPU test_gpu_path.py covers it")
def test_model_on_the_kernel_path_gives_the_portable_logits(variant, tmp_path):
    """A whole tiny model over a mixed schedule (prefill, chunked prefill, decode), built once with
    the portable backend and once with the Triton backend."""
    save_tiny_model(tiny_config(variant), tmp_path)
    tp = TPGroup(0, 1, None)
    model, config = load_model(str(tmp_path), tp, torch.float32, CPU, backend="portable")
    schedule = mixed_schedule(config.vocab_size)
    _, expected = run_schedule(PagedBatchDriver(model), schedule)
    kernel_model, _ = load_model(str(tmp_path), tp, torch.float32, CPU, backend="triton")
    _, actual = run_schedule(PagedBatchDriver(kernel_model), schedule)
    for seq_id, logits in expected.items():
        torch.testing.assert_close(actual[seq_id], logits, atol=1e-4, rtol=1e-4)


def test_attention_in_graph_layout_matches_the_exact_grid():
    """Inside a CUDA graph the kernel gets no host copies: block starts come from the device and the
    grid is an upper bound, with empty padding sequences and padding tokens after the real ones."""
    from tgi_server.kernels.attention import paged_attention

    generator = torch.Generator().manual_seed(1)
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    exact = _metadata([7, 1, 19], [0, 21, 5], 16, 24, generator)
    kv_cache = torch.randn(2, 24, 16, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    q = torch.randn(27 + 5, num_heads, head_dim, generator=generator).to(DEVICE)  # 5 padding tokens
    expected = paged_attention(q[:27], kv_cache, exact, head_dim**-0.5, None)
    starts = exact.query_start_loc_cpu + [27, 27]  # two empty padding sequences
    padded = AttentionMetadata(
        slot_mapping=exact.slot_mapping,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(exact.seq_lens_cpu + [0, 0], dtype=torch.int32, device=DEVICE),
        block_tables=torch.cat([exact.block_tables, exact.block_tables[:2] * 0]),
        query_start_loc_cpu=[],
        seq_lens_cpu=[],
        max_query_len=32,
    )
    torch.testing.assert_close(paged_attention(q, kv_cache, padded, head_dim**-0.5, None)[:27], expected)


@pytest.mark.parametrize("num_tokens, num_experts, top_k, gemv", [
    (1, 8, 2, True),  # one decode token: the per-pair matrix-vector path
    (4, 16, 2, True),  # a few decode tokens, some may share an expert
    (13, 6, 2, False),  # grouped GEMMs, 16-row blocks; some experts unused
    (40, 4, 2, False),  # 20 rows per expert: 64-row blocks
    (150, 4, 2, False),  # 75 rows per expert: 128-row blocks
])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_moe_kernel_matches_the_portable_expert_loop(num_tokens, num_experts, top_k, gemv, activation):
    from tgi_server.kernels import moe

    assert moe.uses_gemv(num_tokens, top_k, num_experts) == gemv, "the cases no longer cover both paths"
    generator = torch.Generator().manual_seed(num_tokens)
    hidden_size, width = 96, 40  # neither a multiple of the tiles
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(DEVICE)
    w13 = (torch.randn(num_experts, 2 * width, hidden_size, generator=generator) / 10).to(DEVICE)
    w2 = (torch.randn(num_experts, hidden_size, width, generator=generator) / 10).to(DEVICE)
    logits = torch.randn(num_tokens, num_experts - 1, generator=generator)  # the last expert is never picked
    topk_weights, topk_ids = logits.softmax(-1).topk(top_k, dim=-1)
    topk_weights, topk_ids = topk_weights.to(DEVICE), topk_ids.to(DEVICE)
    expected = portable.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
    actual = moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("down_config", [(2, 64, 4, False), (4, 32, 4, True), (1, 128, 4, True)],
                         ids=["loop over experts", "experts side by side", "one row, wide tile"])
@pytest.mark.parametrize("num_tokens, top_k", [(1, 2), (3, 3), (2, 8)])
def test_every_down_projection_kernel_of_the_decode_path_matches_the_portable_expert_loop(num_tokens, top_k, down_config):
    """Both down-projection kernels of the per-pair path, tiles that cut K and N unevenly, top-k not a
    power of two."""
    from tgi_server.kernels import moe

    generator = torch.Generator().manual_seed(top_k)
    num_experts, hidden_size, width = 12, 96, 40
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(DEVICE)
    w13 = (torch.randn(num_experts, 2 * width, hidden_size, generator=generator) / 10).to(DEVICE)
    w2 = (torch.randn(num_experts, hidden_size, width, generator=generator) / 10).to(DEVICE)
    topk_weights, topk_ids = torch.randn(num_tokens, num_experts, generator=generator).softmax(-1).topk(top_k, dim=-1)
    topk_weights, topk_ids = topk_weights.to(DEVICE), topk_ids.to(DEVICE)
    expected = portable.fused_moe(hidden, w13, w2, topk_weights, topk_ids, "silu")
    actual = moe._gemv_experts(hidden, w13, w2, topk_weights.reshape(-1).float().contiguous(), topk_ids, "silu",
                               down_config=down_config)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens, num_experts, top_k, renormalize", [
    (1, 128, 8, True),  # Qwen3-MoE
    (7, 8, 2, True),  # Mixtral
    (3, 60, 4, False),  # Qwen2-MoE: not renormalised; not a power of two
])
def test_router_kernel_picks_the_portable_top_k(num_tokens, num_experts, top_k, renormalize):
    from tgi_server.kernels.moe import route_experts

    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_experts)).to(DEVICE)
    expected_weights, expected_ids = portable.route_experts(logits, top_k, renormalize)
    weights, ids = route_experts(logits, top_k, renormalize)
    assert ids.tolist() == expected_ids.tolist()
    torch.testing.assert_close(weights, expected_weights)


def test_router_kernel_picks_distinct_valid_experts_for_a_padding_row_of_nan():
    """A padded row's garbage must not send the expert kernels out of bounds."""
    from tgi_server.kernels.moe import route_experts

    logits = torch.tensor([[float("nan")] * 12, [float("inf")] * 2 + [0.0] * 10, [0.0] * 12]).to(DEVICE)
    _, ids = route_experts(logits, 4, True)
    for row in ids.tolist():
        assert len(set(row)) == 4 and all(0 <= e < 12 for e in row), row
