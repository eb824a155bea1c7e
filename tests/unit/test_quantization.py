"""`--quantize fp8`: weights in fp8 (a scale per output row), activations quantized per token; the
fp8 tensor-core matmul against the portable reference, and whole tiny models against the unquantized
ones (fp8 changes the logits a little, by a bounded amount, on one rank and on two)."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from model_helpers import PagedBatchDriver, mixed_schedule, run_schedule, save_tiny_model, tiny_config, tp_rank_worker

from tgi_server.distributed import SINGLE
from tgi_server.models.registry import UnsupportedModelError, load_model
from tgi_server.ops import portable, triton_backend
from tgi_server.quantization import FP8_DTYPE, quantize_fp8_rows

# fp8 keeps 3 mantissa bits. On these tiny random models (64 wide, where nothing averages the rounding
# out) the logits move by about a tenth of their spread on average, and most argmaxes stay; measured:
# mean |change| 0.10-0.13 of the logits' standard deviation, 73-90% of argmaxes kept.
MEAN_TOLERANCE = 0.15
MIN_ARGMAX_AGREEMENT = 0.7


def _logits(model_dir: str, quantize: str | None) -> dict[str, torch.Tensor]:
    model, config = load_model(model_dir, SINGLE, torch.float32, torch.device("cpu"), quantize=quantize)
    return run_schedule(PagedBatchDriver(model), mixed_schedule(config.vocab_size))[1]


def _assert_near(got: dict, expected: dict) -> None:
    num_agree = num_rows = 0
    for seq_id, reference in expected.items():
        assert (got[seq_id] - reference).abs().mean() < MEAN_TOLERANCE * reference.std(), seq_id
        assert not torch.equal(got[seq_id], reference)  # quantized, not the same weights
        num_agree += (got[seq_id].argmax(-1) == reference.argmax(-1)).sum().item()
        num_rows += reference.shape[0]
    assert num_agree >= MIN_ARGMAX_AGREEMENT * num_rows


def test_rows_quantize_to_fp8_with_each_rows_maximum_at_448():
    values = torch.randn(5, 64) * torch.tensor([[1e-3], [1.0], [30.0], [0.5], [1e3]])
    quantized, scales = quantize_fp8_rows(values)
    assert quantized.dtype == FP8_DTYPE and scales.shape == (5, 1)
    assert torch.equal(quantized.float().abs().amax(dim=1), torch.full((5,), 448.0))
    torch.testing.assert_close(quantized.float() * scales, values, rtol=0.07, atol=0)


@pytest.mark.usefixtures("triton_interpreter")  # the activations' quantization kernel, on CPU
def test_the_fp8_tensor_core_matmul_gives_the_portable_reference():
    """On the GPU where there is one (torch's CPU `_scaled_mm` takes row-wise scales in some builds only)."""
    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(7, 64, generator=generator).to(device)
    weight, scales = quantize_fp8_rows(torch.randn(48, 64, generator=generator).to(device))
    bias = torch.randn(48, generator=generator).to(device)
    expected = portable.linear(x, weight, bias, scales.squeeze(1))
    # (The GPU kernel sums in its own order and rounds on its own: within 1%, not bit-equal.)
    tolerance = 2e-2 if device == "cuda" else 1e-5
    torch.testing.assert_close(triton_backend.linear(x, weight, bias, scales.squeeze(1)), expected, rtol=tolerance, atol=tolerance)
    # Only the activations' rounding to fp8 separates it from the dequantized weight's plain product.
    plain = torch.nn.functional.linear(x, weight.float() * scales, bias)
    assert (expected - plain).abs().max() < 0.05 * plain.abs().max()


@pytest.mark.parametrize("variant", ["llama3_biased", "gemma2", "qwen3_moe"])
def test_an_fp8_model_holds_its_projections_in_a_byte_and_stays_near_the_unquantized_logits(variant, tmp_path):
    save_tiny_model(tiny_config(variant), tmp_path)
    model, _ = load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"), quantize="fp8")
    projections = {name: p.dtype for name, p in model.named_parameters() if name.endswith("proj.weight")}
    assert projections and set(projections.values()) == {FP8_DTYPE}
    _assert_near(_logits(str(tmp_path), "fp8"), _logits(str(tmp_path), None))


def test_two_fp8_ranks_stay_near_the_unquantized_logits(tmp_path):
    save_tiny_model(tiny_config("llama3_biased"), tmp_path / "llama")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(tp_rank_worker, args=(2, port, {"llama": str(tmp_path / "llama")}, str(tmp_path), "fp8"), nprocs=2, join=True)
    expected = _logits(str(tmp_path / "llama"), None)
    for rank in range(2):
        _assert_near(torch.load(tmp_path / f"llama_rank{rank}.pt"), expected)


def test_fp8_on_the_transformers_fallback_is_refused_before_loading(tmp_path):
    save_tiny_model(tiny_config("gpt_neox"), tmp_path)
    with pytest.raises(UnsupportedModelError, match="transformers fallback"):
        load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"), quantize="fp8")
