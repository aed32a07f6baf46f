"""The DeepSpeed and megatron-core versions the engine's adaptations were written and tested against.

Every adaptation in gorilla_dist/engine/ reads or replaces something private of these libraries; under
another version it may silently do the wrong thing. So a process stops at start when the installed
versions differ from the tested ones, unless the user says otherwise (GORILLA_UNTESTED_VERSIONS=1),
and then it warns. `constraints.txt` pins the same versions; `pyproject.toml` allows their series.
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

from gorilla_dist.errors import UserError

TESTED = {"deepspeed": "0.19.8", "megatron-core": "0.16.1"}
OVERRIDE = "GORILLA_UNTESTED_VERSIONS"


class VersionError(UserError):
    pass


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions(found: dict[str, str | None] | None = None) -> None:
    """Raise VersionError naming each package whose installed version is not the tested one (a warning
    instead when GORILLA_UNTESTED_VERSIONS=1). `found` (tests): versions to check instead of the
    installed ones."""
    found = found if found is not None else {name: installed(name) for name in TESTED}
    wrong = {name: version for name, version in found.items() if version != TESTED[name]}
    if not wrong:
        return
    listed = ", ".join(f"{name} {version or 'not installed'} (tested: {TESTED[name]})"
                       for name, version in wrong.items())
    if os.environ.get(OVERRIDE) == "1":
        warnings.warn(f"untested versions: {listed}; going on because {OVERRIDE}=1. The engine's adaptations "
                      "(gorilla_dist/engine/) may not fit them: compare losses against the golden values "
                      "(tests/golden) before trusting a run", stacklevel=2)
        return
    pins = " ".join(f"{name}=={version}" for name, version in TESTED.items())
    raise VersionError(f"installed {listed}: gorilla_dist's engine adapts private parts of these libraries and "
                       f"was tested only with the versions named. Install them (pip install -c constraints.txt "
                       f"-e . , or pip install {pins}), or set {OVERRIDE}=1 to go on at your own risk")
