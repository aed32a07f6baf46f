"""README's two commands stay true: CI runs the README's test command verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())[:2]


def test_ci_runs_the_readme_test_command():
    train, test = readme_commands()
    assert train.endswith("python -m launcher") and "-c constraints.txt" in train
    assert test.endswith("python -m pytest -q")
    assert test in (REPO / ".ci" / "run").read_text().splitlines()


def test_constraints_pin_cpu_torch_but_pyproject_does_not():
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().split()
    assert not re.search(r'"torch==', (REPO / "pyproject.toml").read_text())
