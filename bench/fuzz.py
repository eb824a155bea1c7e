"""Fuzz every route of the HTTP API with schemathesis, longer than tests/e2e/test_fuzz_openapi.py.

Starts a real server (launcher, shard and router; a tiny random Llama on CPU), runs `st run` against
its /api-doc/openapi.json with the checks and hooks of tests/e2e/schemathesis_hooks.py, and exits
with schemathesis' status. Without --seed every run explores new inputs.

    python bench/fuzz.py --max-examples 200
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from schemathesis_hooks import schemathesis_command  # noqa: E402
from server_helpers import build_tiny_llama, running_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100, help="Generated cases per route and phase.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-total-tokens", type=int, default=64, help="Keeps generations short.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tgi-fuzz-") as workdir:
        work = Path(workdir)
        model = build_tiny_llama(work / "llama", work / "hf_home")
        server_args = ("--max-batch-total-tokens", "4096", "--max-total-tokens", str(args.max_total_tokens))
        with running_server(str(model), work / "hf_home", *server_args) as server:
            argv, env = schemathesis_command(server.url, args.max_examples, args.seed)
            code = subprocess.run(argv, env=env, cwd=work).returncode
            errors = [line for line in server.log.splitlines() if "unexpected error" in line or "step failed" in line]
    print("\n".join(errors) or "server log: no unexpected errors", file=sys.stderr)
    return code or (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
