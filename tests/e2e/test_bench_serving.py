"""bench/serving.py end to end on CPU: it launches a tiny server, measures, stops it, and writes its JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from server_helpers import save_tiny_model, tiny_config

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"


def test_serving_benchmark_launches_a_server_and_reports_exact_token_counts(tmp_path, hf_home, smollm2_tokenizer_dir):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / "llama")
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--launch", f"--model-id {model} --max-batch-total-tokens 4096", "--num-prompts", "8",
            "--input-len", "16", "--output-len", "8", "--max-concurrency", "4", "--result-json", str(out)]
    run = subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    result = json.loads(out.read_text())
    metrics = result["results"]
    assert (metrics["completed"], metrics["failed"], metrics["errors"]) == (8, 0, [])
    assert metrics["total_input_tokens"] == 8 * 16
    assert metrics["total_output_tokens"] == 8 * 8 and metrics["num_output_length_mismatches"] == 0
    assert 0 < metrics["median_ttft_ms"] < metrics["median_e2el_ms"] <= metrics["p99_e2el_ms"]
    assert 0 < metrics["median_itl_ms"] <= metrics["p99_itl_ms"]
    assert 0 < metrics["mean_tpot_ms"] < metrics["mean_e2el_ms"]
    assert metrics["output_throughput"] == metrics["total_output_tokens"] / metrics["duration_s"]
    assert result["config"]["num_prompts"] == 8 and result["date"] and result["device"]
    assert result["server_info"]["model_id"] == str(model)
    assert "Output token throughput (tok/s)" in run.stdout

    port = int(result["config"]["base_url"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the launched server is still listening"


def test_the_structured_workload_sends_schemas_keeps_exact_token_counts_and_times_new_schemas_apart(tmp_path, hf_home, smollm2_tokenizer_dir):
    """--grammar-schemas N: each request under one of N JSON schemas that never completes, so the
    outputs keep their length; the first request of each schema is reported apart (its compile)."""
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / "llama")
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--launch", f"--model-id {model} --max-batch-total-tokens 4096", "--num-prompts", "6",
            "--input-len", "16", "--output-len", "12", "--max-concurrency", "3", "--grammar-schemas", "2",
            "--result-json", str(out)]
    run = subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads(out.read_text())["results"]
    assert (metrics["completed"], metrics["failed"], metrics["num_output_length_mismatches"]) == (6, 0, 0)
    assert metrics["median_ttft_new_schema_ms"] > 0 and metrics["median_ttft_cached_schema_ms"] > 0


def test_the_multi_turn_chat_workload_sends_each_conversation_back_and_the_server_reuses_its_prefix(
    tmp_path, hf_home, smollm2_tokenizer_dir
):
    model = save_tiny_model(tiny_config("llama"), smollm2_tokenizer_dir, tmp_path / "llama")
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--launch", f"--model-id {model} --max-batch-total-tokens 4096", "--multi-turn", "3", "--turns", "3",
            "--system-prompt-len", "48", "--input-len", "8", "--output-len", "6", "--result-json", str(out)]
    run = subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads(out.read_text())["results"]
    assert (metrics["completed"], metrics["failed"], metrics["num_output_length_mismatches"]) == (9, 0, 0)
    # Each later turn's prompt holds the one before it; every turn holds the 48-token system prompt.
    assert metrics["total_input_tokens"] > 9 * 48
    assert metrics["total_cached_input_tokens"] >= 9 * 32
    assert metrics["median_ttft_first_turn_ms"] > 0 and metrics["median_ttft_later_turns_ms"] > 0
