"""The README's curl walkthrough, run verbatim with bash against a live service."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests import factories
from tests.integration.conftest import ROOT
from tests.integration.test_faults import Processes

pytestmark = pytest.mark.integration


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", readme, re.DOTALL)
    assert block, "README lost its walkthrough block"
    return block.group(1)


def test_readme_walkthrough_runs_as_written(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_files.py"), "--out", str(tmp_path),
                    "--epochs", "0"], check=True, capture_output=True)
    service = Processes(tmp_path / "service", {"MODELPRESS_VALIDATION_WAIT_S": "60"})
    try:
        service.start_worker("modelpress.jobs", "jobs")
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path,
                                env=service.env | {"API": service.url}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{service.tail()}"
        assert '"status":"succeeded"' in result.stdout
        assert '"verdicts"' in result.stdout
        weights = tmp_path / "model.safetensors"
        from safetensors.torch import load_file

        assert float((load_file(str(weights))["conv1.weight"] == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    finally:
        service.stop()


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")  # CI runs exactly the README command
    assert factories.LOCAL_AUTH["Authorization"].split()[-1] in readme
