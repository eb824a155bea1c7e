"""Schemathesis hooks for fuzzing the router (loaded with SCHEMATHESIS_HOOKS=schemathesis_hooks).

Built-in `negative_data_rejection` wants every schema-violating request answered with a 4xx. TGI's
streaming routes answer a well-formed request whose values are invalid (`temperature: 0`) with HTTP
200 and a single error event, because the stream has started before validation runs; this check is
the built-in one, with that event counted as the rejection it is. Run it instead of the built-in.

`schemathesis_command` is the run that tests/e2e/test_fuzz_openapi.py and bench/fuzz.py share.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection


@schemathesis.check
def rejects_invalid_data(ctx, response, case):
    if _is_validation_error_event(response):
        return None
    return negative_data_rejection(ctx, response, case)


def _is_validation_error_event(response) -> bool:
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return False
    lines = [line for line in response.content.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
    if len(lines) != 1:
        return False
    try:
        event = json.loads(lines[0].removeprefix("data:"))
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("error_type") == "validation"


# Every check, but positive_data_acceptance (a schema cannot say which prompts fit the token budget,
# so schema-valid requests may rightly get a 422) and negative_data_rejection (replaced, above).
EXCLUDED_CHECKS = "positive_data_acceptance,negative_data_rejection"


def schemathesis_command(base_url: str, max_examples: int, seed: int | None = None) -> tuple[list[str], dict]:
    """`st run` against the server's /api-doc/openapi.json with these hooks, and its environment."""
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/api-doc/openapi.json",
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", str(max_examples),
        "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60",
    ]
    if seed is not None:
        argv += ["--seed", str(seed)]
    here = str(Path(__file__).parent)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    return argv, env
