"""The Triton W4A16 linear computes what `F.linear` computes over the dequantized 4-bit weight, given
the weight in the kernels' layout (`w4a16.interleave`) and the reference the loaders' one.

On a GPU the kernel runs natively; without one, on CPU through Triton's interpreter
(TRITON_INTERPRET=1), so CI checks its arithmetic. fp32 agrees to float rounding; bf16 to a few
rounding steps, since the interpreter truncates the dequantized weights and the output to bf16 where
GPUs round (each weight off by up to one bf16 step, ~sqrt(K) of them adding up in an output).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from tgi_server.quantization import dequantize_int4, pack_int4

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 set before triton is imported (conftest.py)", allow_module_level=True)

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
TOLERANCES = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 5e-2, "rtol": 2**-6}}


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _int4_weight(n: int, k: int, group_size: int, dtype: torch.dtype, generator: torch.Generator):
    """Random (qweight [n, k // 8] int32, scales, zeros [n, k // group_size] in dtype) in the loaders' layout."""
    qweight = pack_int4(torch.randint(0, 16, (n, k), generator=generator))
    scales = 0.001 + 0.019 * torch.rand(n, k // group_size, generator=generator)  # uniform 0.001 .. 0.02
    zeros = torch.randint(0, 16, (n, k // group_size), generator=generator).float()
    return qweight.to(DEVICE), scales.to(DEVICE, dtype), zeros.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, group_size, with_bias", [
    (1, 72, 256, 32, False),  # decode, groups smaller than a chunk: the tensor-core kernel, four groups in a K tile
    (3, 203, 256, 128, True),  # a few decode rows: the GEMV kernel, N not a multiple of its tile
    (2, 41, 384, 384, True),  # the GEMV kernel per-channel, K three chunks (one chunk per step)
    (4, 16, 1024, 256, False),  # the GEMV kernel at its row limit, two chunks per group
    (17, 64, 64, 64, True),  # per-channel (group_size = K), K shorter than the decode tile
    (3, 72, 200, 200, False),  # per-channel with K no multiple of the tile: per-element scales, ragged K
    (70, 200, 256, 32, False),  # prefill tiles, ragged M and N
    (70, 72, 256, 256, True),  # prefill, per-channel
])
def test_int4_linear_kernel_matches_the_dequantized_linear(m, n, k, group_size, with_bias, dtype):
    from tgi_server.kernels.w4a16 import int4_linear, interleave

    generator = torch.Generator().manual_seed(m * 1000 + n)
    qweight, scales, zeros = _int4_weight(n, k, group_size, dtype, generator)
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if with_bias else None
    weight = dequantize_int4(qweight, scales, zeros, group_size).to(dtype)  # [n, k], rounded as the layers round it
    # float32 sums over the same rounded operands: the kernel's result up to its single output rounding
    expected = F.linear(x.float(), weight.float(), bias.float() if with_bias else None)
    actual = int4_linear(x, interleave(qweight), scales, zeros, group_size, bias)
    assert actual.shape == (m, n) and actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, **TOLERANCES[dtype])
    if dtype == torch.float32:  # the brief's reference, literally
        torch.testing.assert_close(actual, F.linear(x, weight, bias), **TOLERANCES[dtype])


@pytest.mark.parametrize("k, group_size, config, gemv_config", [
    (256, 32, (16, 32, 128, 4), None), (256, 32, (32, 16, 256, 4), None),  # the tensor-core kernel, the kernels' layout
    (200, 40, (32, 16, 16, 4), None), (200, 40, (16, 32, 64, 4), None),  # ... the loaders' layout, groups across tiles
    (512, 128, None, (4, 2, 4, 1)), (512, 256, None, (1, 4, 2, 1)), (384, 384, None, (16, 1, 4, 1)),  # the GEMV kernel at 5 rows
    (512, 128, None, (4, 2, 4, 2)), (384, 384, None, (16, 1, 4, 2)),  # ... with two row tiles a program
])
def test_int4_linear_kernels_are_exact_for_any_tiling(k, group_size, config, gemv_config):
    """Tile configs other than the defaults: the tensor-core kernel's K tiles of one or two chunks (4 or 8
    groups each) in the kernels' layout, and of 16 or 64 in the loaders' (K = 200, no multiple of a
    chunk), where groups of 40 straddle tiles; the GEMV kernel with one to four chunks per step and a
    group of one, two or three chunks, one or two row tiles a program; N = 40 ragged for 16-row tiles
    (and a second tile wholly past N). Small integer-valued data, so every sum is exact."""
    from tgi_server.kernels.w4a16 import int4_linear, interleave

    generator = torch.Generator().manual_seed(1)
    m, n = 5, 40
    qweight, _, zeros = _int4_weight(n, k, group_size, torch.float32, generator)
    scales = torch.randint(1, 4, zeros.shape, generator=generator).float().to(DEVICE)
    x = torch.randint(-3, 4, (m, k), generator=generator).float().to(DEVICE)
    expected = F.linear(x, dequantize_int4(qweight, scales, zeros, group_size))
    actual = int4_linear(x, interleave(qweight), scales, zeros, group_size, config=config, gemv_config=gemv_config)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's check; on a GPU test_gpu_path.py covers it")
def test_a_quantized_checkpoint_on_the_kernel_path_gives_the_portable_logits(tmp_path):
    """A tiny AWQ checkpoint over the mixed schedule (prefill, chunks, decode down to one row), built
    with the portable backend and with the Triton one (the interpreter makes each model ~25 s: one
    format; the layer code around the kernel is the portable path's)."""
    from model_helpers import PagedBatchDriver, mixed_schedule, run_schedule, tiny_config
    from quantized_checkpoints import save_quantized

    from tgi_server.distributed import SINGLE
    from tgi_server.models.registry import load_model

    save_quantized(tiny_config("llama3_biased"), tmp_path, tmp_path, "awq")
    logits = {}
    for backend in ("portable", "triton"):
        model, config = load_model(str(tmp_path), SINGLE, torch.float32, DEVICE, backend=backend)
        logits[backend] = run_schedule(PagedBatchDriver(model), mixed_schedule(config.vocab_size))[1]
    for seq_id, expected in logits["portable"].items():
        torch.testing.assert_close(logits["triton"][seq_id], expected, atol=1e-4, rtol=1e-4)
