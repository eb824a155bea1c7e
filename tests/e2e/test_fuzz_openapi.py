"""Schemathesis fuzzes every route of /api-doc/openapi.json on a real server (tiny random Llama).

A bounded run (15 examples per operation, ~70 s alone on 2 cores: most of it is generating tokens, hence the
short context); bench/fuzz.py runs the same for longer with a random seed.
"""

from __future__ import annotations

import subprocess

import pytest
from schemathesis_hooks import schemathesis_command
from server_helpers import running_server, save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_home, smollm2_tokenizer_dir):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path_factory.mktemp("fuzz") / "llama")
    # Short generations keep the run fast; the shape of the answers does not depend on their length.
    args = ("--max-batch-total-tokens", "4096", "--max-total-tokens", "32")
    with running_server(str(model), hf_home, *args) as server:
        yield server


# A random name cannot name a loaded adapter, nor a random path a readable one (and this server has LoRA
# off): these routes answer 4xx to nearly every generated request by design, which schemathesis warns of.
LORA_ROUTES = {"POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"}


def _warned_operations(stdout: str) -> set[str]:
    """The operations listed under schemathesis' WARNINGS heading."""
    section = stdout.partition(" WARNINGS ")[2].partition(" SUMMARY ")[0]
    return {line.strip().removeprefix("- ") for line in section.splitlines() if line.strip().startswith("- ")}


def test_fuzzed_requests_get_no_5xx_and_answers_match_the_documented_schemas(server, tmp_path):
    argv, env = schemathesis_command(server.url, max_examples=15, seed=1)
    run = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-10000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or _warned_operations(run.stdout) <= LORA_ROUTES, run.stdout[-3000:]
    # Nothing reached the catch-all 500 handler or failed a step.
    assert "unexpected error" not in server.log and "step failed" not in server.log
