"""The README's metric reference is generated from the metric table and must be current."""

from __future__ import annotations

import subprocess
import sys

from adamwatch_sidecar.metric_table import METRICS

from .conftest import ROOT


def test_readme_metric_reference_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    for spec in METRICS:
        assert f"| `{spec.name}` |" in readme


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("bash scripts/demo.sh")
    assert first_block[1].startswith("bash scripts/test.sh")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
