"""The engine runs only on the DeepSpeed / megatron-core versions its adaptations were tested with,
unless the user overrides it; the pins agree everywhere."""

import re
import warnings
from pathlib import Path

import pytest

from gorilla_dist.engine.versions import OVERRIDE, TESTED, VersionError, check_versions, installed

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_versions_are_the_tested_ones():
    check_versions()  # this machine installs with -c constraints.txt
    assert {name: installed(name) for name in TESTED} == TESTED


def test_a_newer_version_stops_with_installed_tested_and_the_override(monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    with pytest.raises(VersionError) as err:
        check_versions({"deepspeed": "0.20.1", "megatron-core": TESTED["megatron-core"]})
    message = str(err.value)
    assert f"installed deepspeed 0.20.1 (tested: {TESTED['deepspeed']})" in message
    assert "megatron-core" not in message.split(":")[0]  # only the wrong one is named first
    assert f"set {OVERRIDE}=1 to go on" in message and f"deepspeed=={TESTED['deepspeed']}" in message
    with pytest.raises(VersionError, match=r"megatron-core not installed \(tested: 0\.16\.1\)"):
        check_versions({"deepspeed": TESTED["deepspeed"], "megatron-core": None})


def test_the_override_goes_on_with_a_warning(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_versions({"deepspeed": "0.20.1", "megatron-core": "0.17.0"})
    assert len(caught) == 1 and "untested versions: deepspeed 0.20.1" in str(caught[0].message)


def test_pins_agree_with_the_tested_versions():
    lines = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    constraints = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert {name: constraints[name] for name in TESTED} == TESTED
    pyproject = (REPO / "pyproject.toml").read_text()
    for name, version in TESTED.items():
        major, minor, _ = version.split(".")
        assert re.search(rf'"{name}>={re.escape(version)},<{major}\.{int(minor) + 1}"', pyproject), name
