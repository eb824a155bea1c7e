"""The skinny kernel on fp8 weights (batch-1 decode under `--quantize fp8`) computes x times the
dequantized weight, x in its own dtype (weight-only fp8).

The reference is float32 arithmetic on the dequantized weight; kernel and reference differ only in
summation order (and, in bf16, in the final rounding: the interpreter truncates where GPUs round).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 set before triton is imported (conftest.py)", allow_module_level=True)

from tgi_server.quantization import quantize_fp8_rows  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [64, 300])
@pytest.mark.parametrize("num_rows", [1, 2, 5])
def test_fp8_weights_through_the_skinny_kernel_give_x_times_the_dequantized_weight(num_rows, k, with_bias, dtype):
    """Ragged edges: N = 37 not a multiple of BLOCK_N, K = 300 not one of any tile, M = 5 not a power
    of two; the default tiles (one K step) and small ones (several K steps, a ragged last one)."""
    from tgi_server.kernels.skinny import skinny_linear

    generator = torch.Generator().manual_seed(1000 * num_rows + k)
    n = 37
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    # Rows of very different magnitudes, so a lost or misplaced scale shows.
    magnitudes = torch.logspace(-2, 2, n)[torch.randperm(n, generator=generator)]
    weight, weight_scale = quantize_fp8_rows(torch.randn(n, k, generator=generator) * magnitudes[:, None])
    weight, weight_scale = weight.to(DEVICE), weight_scale.squeeze(1).to(DEVICE)
    bias = (torch.randn(n, generator=generator) * 10).to(DEVICE, dtype) if with_bias else None

    dequantized = weight.float() * weight_scale[:, None]
    expected = (x.float() @ dequantized.t() + (bias.float() if with_bias else 0)).to(dtype)
    scale = expected.float().abs().max().item()
    if dtype == torch.float32:
        tolerance = {"atol": 1e-4 * scale, "rtol": 1e-4}
    else:
        tolerance = {"atol": 1e-4 * scale, "rtol": 2**-7}
    for config in (None, (8, 128, 4)):
        y = skinny_linear(x, weight, bias, config=config, weight_scale=weight_scale)
        assert y.shape == (num_rows, n) and y.dtype == dtype
        torch.testing.assert_close(y, expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_quantize_to_fp8_per_row_in_one_kernel_bit_for_bit_as_the_reference(dtype):
    """The fp8 tensor-core path's activations (more rows than the skinny kernel takes): each row scaled
    by its own maximum and rounded to e4m3 exactly as `quantization.quantize_fp8_rows` rounds them.
    Rows of very different magnitudes, an all-zero row, 3000 columns (two passes of the kernel's
    2048-wide block, the second ragged), and values that round up to the next power of two."""
    from tgi_server.kernels.fused import quantize_fp8_rows as fused_quantize_fp8_rows

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3000, generator=generator) * torch.tensor([1.0, 10.0, 1e-3, 100.0, 0.5, 1.0])[:, None]
    x[2] = 0.0
    x[5, :4] = torch.tensor([448.0, 125.4, -31.98, 7.76])  # / scale 1: round up to 128, -32 and 8
    x[4, 2999] = -50.0  # a row's maximum in the last block
    x = x.to(DEVICE, dtype)
    values, scales = fused_quantize_fp8_rows(x)
    expected_values, expected_scales = quantize_fp8_rows(x)
    assert values.dtype == expected_values.dtype and scales.shape == (6, 1)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [256, 300])
@pytest.mark.parametrize("num_rows", [1, 3, 20])
def test_rows_on_the_fp8_tensor_cores_give_the_portable_fp8_linear(num_rows, k, with_bias, dtype):
    """W8A8, x quantized per token (inside the kernel for one row, by the activation kernel for more),
    as the portable linear quantizes it. N = 37 (a ragged row tile), K = 300 (a ragged K tile), M = 3
    and 20 (x padded to 16 and 32 columns), rows of x of different magnitudes, each row's largest
    value in its last K tile; the default tiles and a small K tile (several K steps)."""
    from tgi_server.kernels.skinny import fp8_gemv
    from tgi_server.ops import portable

    generator = torch.Generator().manual_seed(100 * num_rows + k)
    n = 37
    x = torch.randn(num_rows, k, generator=generator) * torch.logspace(-1, 1, num_rows)[:, None]
    x[:, k - 3] = -9.0 * torch.logspace(-1, 1, num_rows)
    x = x.to(DEVICE, dtype)
    magnitudes = torch.logspace(-2, 2, n)[torch.randperm(n, generator=generator)]
    weight, weight_scale = quantize_fp8_rows(torch.randn(n, k, generator=generator) * magnitudes[:, None])
    weight, weight_scale = weight.to(DEVICE), weight_scale.squeeze(1).to(DEVICE)
    bias = (torch.randn(n, generator=generator) * 10).to(DEVICE, dtype) if with_bias else None

    expected = portable.linear(x.cpu(), weight.cpu(), bias.cpu() if with_bias else None, weight_scale.cpu()).to(DEVICE)
    rtol = 1e-4 if dtype == torch.float32 else 2**-7
    for config in (None, (64, 64, 4, 2)):
        y = fp8_gemv(x, weight, weight_scale, bias, config=config)
        assert y.shape == (num_rows, n) and y.dtype == dtype
        for row, expected_row in zip(y, expected):  # each row to its own magnitude
            torch.testing.assert_close(row, expected_row, atol=1e-4 * expected_row.float().abs().max().item(), rtol=rtol)
