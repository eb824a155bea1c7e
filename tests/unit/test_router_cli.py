"""The router's command line: limits left unset are derived from the model and the KV cache its warmup
found (TGI's rules), and the launcher's request-handling flags reach the router."""

import asyncio
from types import SimpleNamespace

import pytest
from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_proto.settings import RouterSettings
from tgi_router import cli

BLOCK_SIZE = 16


def router_args(**overrides) -> RouterSettings:
    return RouterSettings(**{"tokenizer_path": "/tok", "model_id": "m", **overrides})


class FakeShards:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.requests: list[pb.WarmupRequest] = []

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        self.requests.append(request)
        return pb.WarmupResponse(num_blocks=self.num_blocks, block_size=BLOCK_SIZE)


def warmup(args: RouterSettings, num_blocks: int = 1001, max_position: int = 4096, model_max_length=None,
           device_type: str = "cuda"):
    """(limits, the WarmupRequest sent) for a KV cache of `num_blocks` blocks (block 0 is reserved)."""
    shards = FakeShards(num_blocks)
    info = pb.InfoResponse(block_size=BLOCK_SIZE, max_position_embeddings=max_position, device_type=device_type)
    tokenizer = SimpleNamespace(model_max_length=model_max_length)
    return asyncio.run(cli._warmup(args, [shards], info, tokenizer)), shards.requests[0]


def test_unset_limits_come_from_the_model_context_when_the_kv_cache_holds_it():
    limits, request = warmup(router_args(), num_blocks=1001, max_position=4096)  # 16000 tokens of KV cache
    assert (limits.max_total_tokens, limits.max_input_tokens) == (4096, 4095)
    assert (limits.max_batch_prefill_tokens, limits.max_batch_size, limits.num_blocks) == (4096, 128, 1001)
    assert (request.max_total_tokens, request.max_batch_prefill_tokens, request.max_batch_size) == (4096, 4096, 128)


def test_a_kv_cache_smaller_than_the_context_bounds_max_total_tokens():
    limits, _ = warmup(router_args(), num_blocks=101, max_position=4096)  # 100 usable blocks of 16
    assert (limits.max_total_tokens, limits.max_input_tokens) == (1600, 1599)


def test_the_tokenizer_model_max_length_bounds_max_total_tokens():
    limits, _ = warmup(router_args(), max_position=4096, model_max_length=2048)
    assert (limits.max_total_tokens, limits.max_input_tokens) == (2048, 2047)


def test_default_prefill_budget_is_smaller_on_cpu():
    limits, request = warmup(router_args(), max_position=4096, device_type="cpu")
    assert limits.max_batch_prefill_tokens == request.max_batch_prefill_tokens == 512


def test_default_prefill_budget_is_bounded_by_the_context():
    limits, _ = warmup(router_args(), max_position=512)
    assert limits.max_batch_prefill_tokens == 512 and limits.max_total_tokens == 512


def test_limits_that_were_set_are_kept():
    args = router_args(max_input_tokens=100, max_total_tokens=300, max_batch_prefill_tokens=1000, max_batch_size=8)
    limits, request = warmup(args)
    assert (limits.max_input_tokens, limits.max_total_tokens, limits.max_batch_prefill_tokens) == (100, 300, 1000)
    assert limits.max_batch_size == 8 and request.max_total_tokens == 300


def test_max_total_tokens_beyond_the_kv_cache_stops_the_router():
    with pytest.raises(SystemExit, match="Not enough memory to handle `max_total_tokens=5000`"):
        warmup(router_args(max_total_tokens=5000), num_blocks=101)


def test_max_input_tokens_not_below_the_derived_total_stops_the_router():
    with pytest.raises(SystemExit, match=r"`max_input_tokens` \(1600\) must be < `max_total_tokens` \(1600\)"):
        warmup(router_args(max_input_tokens=1600), num_blocks=101)


def test_info_reports_the_validation_workers_and_client_batch_size():
    limits, _ = warmup(router_args())
    shard_info = pb.InfoResponse(dtype="bfloat16", device_type="cuda", kv_cache_dtype="float8_e4m3fn", world_size=2)
    info = cli._info(router_args(validation_workers=5, max_client_batch_size=9), limits, shard_info, 4096)
    assert (info["validation_workers"], info["max_client_batch_size"]) == (5, 9)
    assert (info["model_dtype"], info["model_device_type"], info["kv_cache_dtype"]) == ("bfloat16", "cuda", "float8_e4m3fn")
    assert (info["max_batch_total_tokens"], info["num_shard"]) == (4096, 2)


def test_router_flags_parse_into_its_settings(monkeypatch):
    served = []
    monkeypatch.setattr(cli, "serve", served.append)
    monkeypatch.setenv("API_KEY", "k3y")
    cli.main([
        "--tokenizer-path", "/tok", "--max-client-batch-size", "8", "--validation-workers", "3",
        "--waiting-served-ratio", "0.3", "--max-waiting-tokens", "7", "--cors-allow-origin", "https://a.example,*",
    ])
    settings = served[0]
    assert (settings.max_client_batch_size, settings.validation_workers) == (8, 3)
    assert (settings.waiting_served_ratio, settings.max_waiting_tokens) == (0.3, 7)
    assert settings.cors_allow_origin == ("https://a.example", "*") and settings.api_key == "k3y"


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --tokenizer-path"),
    (["--tokenizer-path", "/tok", "--port", "x"], "argument --port: invalid int value: 'x'"),
    (["--tokenizer-path", "/tok", "--validation-workers", "0"], "`validation_workers` must be >= 1, got 0"),
    (["--tokenizer-path", "/tok", "--max-input-tokens", "9", "--max-total-tokens", "9"],
     "`max_input_tokens` must be < `max_total_tokens`, got 9 and 9"),
])
def test_bad_router_flags_exit_2_with_one_line_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
