"""The router's command line and environment, from the launcher's config."""

from __future__ import annotations

import dataclasses
import os
import sys

from tgi_launcher.config import LauncherConfig
from tgi_proto.settings import env_of, to_argv


def router_argv(config: LauncherConfig, tokenizer_path: str, shard_addresses: tuple[str, ...] = ()) -> list[str]:
    """`tgi_router` serving HTTP in front of the shards: the flags of `config.router` that differ from
    the router's defaults (token limits left unset are derived by the router after warmup).
    `shard_addresses`: every shard's gRPC target, where some are on other nodes (default: the Unix sockets)."""
    settings = dataclasses.replace(config.router, tokenizer_path=tokenizer_path, shard_addresses=shard_addresses)
    return [sys.executable, "-m", "tgi_router", *to_argv(settings)]


def router_env(config: LauncherConfig) -> dict[str, str]:
    """The launcher's environment, plus the secret settings (API_KEY, SHARD_SECRET) kept out of argv, which
    `ps` shows."""
    return {**os.environ, **env_of(config.router)}
