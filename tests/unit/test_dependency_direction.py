"""Router and launcher never import torch (or transformers, which imports it)."""

import subprocess
import sys

import pytest

PROBE = """
import sys, pkgutil, importlib
import {package}
for module in pkgutil.walk_packages({package}.__path__, "{package}."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
assert not heavy, "imported " + ", ".join(heavy)
"""


@pytest.mark.parametrize("package", ["tgi_router", "tgi_launcher", "tgi_proto"])
def test_package_imports_without_torch(package):
    result = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
