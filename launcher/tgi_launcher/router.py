"""The router's command line, built from the launcher's config."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from tgi_launcher.config import LauncherConfig


def router_argv(config: LauncherConfig, tokenizer_path: str) -> list[str]:
    """`tgi_router` serving HTTP in front of the shards. Token limits left unset are not passed: the
    router derives them from the model and the KV cache its warmup finds."""
    argv = [
        sys.executable, "-m", "tgi_router",
        "--model-id", served_model_name(config.model_id), "--tokenizer-path", tokenizer_path,
        "--shard-uds-path", config.shard_uds_path, "--num-shard", str(config.num_shard),
        "--hostname", config.hostname, "--port", str(config.port),
        "--max-concurrent-requests", str(config.max_concurrent_requests),
        "--max-best-of", str(config.max_best_of),
        "--max-stop-sequences", str(config.max_stop_sequences),
        "--max-top-n-tokens", str(config.max_top_n_tokens),
        "--max-client-batch-size", str(config.max_client_batch_size),
        "--validation-workers", str(config.validation_workers),
        "--waiting-served-ratio", str(config.waiting_served_ratio),
        "--max-waiting-tokens", str(config.max_waiting_tokens),
    ]
    optional = {
        "--max-input-tokens": config.max_input_tokens,
        "--max-total-tokens": config.max_total_tokens,
        "--max-batch-prefill-tokens": config.max_batch_prefill_tokens,
        "--max-batch-total-tokens": config.max_batch_total_tokens,
        "--max-batch-size": config.max_batch_size,
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--payload-limit", str(config.payload_limit), "--drain-timeout", str(drain_timeout(config))]
    if config.aip_predict_route:
        argv += ["--predict-route", config.aip_predict_route]
    if config.aip_health_route:
        argv += ["--health-route", config.aip_health_route]
    for origin in config.cors_allow_origin:
        argv += ["--cors-allow-origin", origin]
    return argv


# A GGUF file name's quantization suffix: SmolLM2-135M-Instruct.Q4_1.gguf, model-q8_0.gguf, x.BF16.gguf.
_GGUF_QUANTIZATION = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def served_model_name(model_id: str) -> str:
    """The name /info, /v1/models and OpenAI responses show: a GGUF file's model name (the file name
    without its quantization), or the model id as given (a Hub id, a directory)."""
    if model_id.endswith(".gguf"):
        return _GGUF_QUANTIZATION.sub("", Path(model_id).stem)
    return model_id


# Of --graceful-termination-timeout, what the router keeps back to fail the requests still running and exit.
DRAIN_MARGIN_SECONDS = 5.0


def drain_timeout(config: LauncherConfig) -> float:
    """Seconds the router drains for after SIGTERM: within the launcher's grace before SIGKILL."""
    grace = config.graceful_termination_timeout
    return max(grace - DRAIN_MARGIN_SECONDS, grace / 2)


def router_env(config: LauncherConfig) -> dict[str, str]:
    """The launcher's environment, plus API_KEY when set (kept out of argv, which `ps` shows)."""
    env = dict(os.environ)
    if config.api_key:
        env["API_KEY"] = config.api_key
    return env
