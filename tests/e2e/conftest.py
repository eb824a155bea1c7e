"""End-to-end fixtures: real launcher, real shards, real router, over HTTP on this machine's CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import smollm2_gguf_path


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """A private HF_HOME, so the GGUF tokenizer export starts clean and never touches the user's cache."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(hf_home) -> Path:
    """SmolLM2's tokenizer exported by `text-generation-server prepare` (the path the launcher takes)."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tgi_server", "prepare", str(smollm2_gguf_path())],
        env=env, capture_output=True, text=True, check=True,
    )
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["tokenizer_path"])


