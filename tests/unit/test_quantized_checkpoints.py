"""Pre-quantized checkpoints (fp8, AWQ, GPTQ, compressed-tensors) load as stored and give the logits
of transformers' model of the same weights dequantized (tests/quantized_checkpoints.py builds both),
on one rank and split over two; formats and settings this server lacks are refused before any weight
is read."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from model_helpers import PagedBatchDriver, hf_logits, mixed_schedule, run_schedule, tiny_config, tp_rank_worker
from quantized_checkpoints import FORMATS, save_quantized

from tgi_server.distributed import SINGLE
from tgi_server.models.registry import UnsupportedModelError, load_model
from tgi_server.quantization import FP8_DTYPE, QuantizationConfigError

ATOL = 1e-4
# Split over ranks, a row-parallel projection's input is rounded to fp8 with one scale per token of
# each rank's slice, not of the whole row, so fp8 logits move a little from one rank's (measured:
# mean |change| 0.024-0.028 of the logits' standard deviation, 55-57 of 59 argmaxes kept).
TWO_RANK_FP8_MEAN_TOLERANCE = 0.05
TWO_RANK_FP8_MIN_ARGMAX_AGREEMENT = 0.9
# What each format's projections hold once loaded.
INT4_FORMATS = {fmt for fmt in FORMATS if "fp8" not in fmt}


def _build(tmp_path_factory, fmt: str, variant: str = "llama3_biased"):
    directory = tmp_path_factory.mktemp(fmt)
    reference = save_quantized(tiny_config(variant), directory, directory, fmt)
    return str(directory), reference


def _assert_reference_logits(seq_to_logits: dict, seq_to_tokens: dict, reference) -> None:
    for seq_id, logits in seq_to_logits.items():
        torch.testing.assert_close(logits, hf_logits(reference, seq_to_tokens[seq_id]), atol=ATOL, rtol=0, msg=seq_id)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_checkpoint_gives_the_logits_of_its_dequantized_weights(fmt, tmp_path_factory):
    model_dir, reference = _build(tmp_path_factory, fmt)
    model, config = load_model(model_dir, SINGLE, torch.float32, torch.device("cpu"))
    stored = {name.rpartition(".")[2]: p.dtype for name, p in model.named_parameters() if "proj" in name}
    if fmt in INT4_FORMATS:
        assert stored["qweight"] == torch.int32 and "weight" not in stored
    else:
        assert stored["weight"] == FP8_DTYPE and stored["weight_scale"] == torch.float32
    seq_to_tokens, seq_to_logits = run_schedule(PagedBatchDriver(model), mixed_schedule(config.vocab_size))
    _assert_reference_logits(seq_to_logits, seq_to_tokens, reference)


def test_two_ranks_split_packed_weights_scales_and_zeros_along_the_right_dims(tmp_path_factory, tmp_path):
    formats = ["awq", "gptq", "gptq-per-channel", "ct-w4a16", "ct-fp8-tensor", "fbgemm-fp8"]
    built = {fmt: _build(tmp_path_factory, fmt) for fmt in formats}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(tp_rank_worker, args=(2, port, {fmt: d for fmt, (d, _) in built.items()}, str(tmp_path)), nprocs=2, join=True)
    seq_to_tokens = {}
    for batch in mixed_schedule(tiny_config("llama3_biased").vocab_size):  # what each rank's worker ran
        for seq_id, token_ids in batch:
            seq_to_tokens.setdefault(seq_id, []).extend(token_ids)
    for fmt, (_, reference) in built.items():
        for rank in range(2):
            seq_to_logits = torch.load(tmp_path / f"{fmt}_rank{rank}.pt")
            if fmt in INT4_FORMATS:
                _assert_reference_logits(seq_to_logits, seq_to_tokens, reference)
                continue
            expected = {seq_id: hf_logits(reference, seq_to_tokens[seq_id]) for seq_id in seq_to_logits}
            for seq_id, logits in seq_to_logits.items():
                assert (logits - expected[seq_id]).abs().mean() < TWO_RANK_FP8_MEAN_TOLERANCE * expected[seq_id].std()
            agree = sum((seq_to_logits[s].argmax(-1) == expected[s].argmax(-1)).sum().item() for s in expected)
            assert agree >= TWO_RANK_FP8_MIN_ARGMAX_AGREEMENT * sum(len(logits) for logits in expected.values())


def _config_only(tmp_path, quantization_config: dict, variant: str = "llama") -> str:
    config = tiny_config(variant)
    config.quantization_config = quantization_config
    config.save_pretrained(tmp_path)  # config.json alone: no weight is ever opened
    return str(tmp_path)


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "awq", "bits": 3, "group_size": 128}, "3-bit weights are not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, "group size 100 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "only the GEMM layout"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise fp8"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}, "8-bit int weights per channel is not supported"),
])
def test_an_unsupported_checkpoint_quantization_is_refused_before_its_weights_are_read(tmp_path, quantization_config, message):
    with pytest.raises(QuantizationConfigError, match=message):
        load_model(_config_only(tmp_path, quantization_config), SINGLE, torch.float32, torch.device("cpu"))


def test_quantize_naming_another_format_than_the_checkpoints_is_refused(tmp_path):
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128}
    with pytest.raises(QuantizationConfigError, match="--quantize gptq was asked for, but the checkpoint is already quantized as awq"):
        load_model(_config_only(tmp_path, awq), SINGLE, torch.float32, torch.device("cpu"), quantize="gptq")


def test_quantize_awq_on_an_unquantized_checkpoint_is_refused(tmp_path):
    with pytest.raises(QuantizationConfigError, match="needs a checkpoint quantized that way"):
        load_model(_config_only(tmp_path, {}), SINGLE, torch.float32, torch.device("cpu"), quantize="awq")


def test_act_order_gptq_on_two_shards_is_refused_before_loading(tmp_path):
    from tgi_server.quantization import weight_format

    with pytest.raises(QuantizationConfigError, match="act-order .* one shard only"):
        weight_format({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, None, num_shard=2)


def test_a_quantized_mixture_of_experts_checkpoint_is_refused_before_loading(tmp_path):
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32}
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts model is not supported yet"):
        load_model(_config_only(tmp_path, awq, "mixtral"), SINGLE, torch.float32, torch.device("cpu"))

