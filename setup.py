"""Which packages the wheel holds: found, never listed by hand (the rest of the metadata is in pyproject.toml).

Two folders of the checkout's layout ship inside the package: conf/ as gorilla_dist.conf and slurm/ as
gorilla_dist.slurm (package data: the Hydra groups, the job template), so an installed copy runs from any
directory. tests/integration/test_installed.py checks that the wheel holds every module and data file of
the tree; tests/unit/test_packaging.py that no top-level name of the checkout root shadows a dependency.
"""

from setuptools import find_namespace_packages, setup

LAYOUT = {"gorilla_dist.conf": "conf", "gorilla_dist.slurm": "slurm"}
"""Package name -> checkout folder, for the folders that ship under gorilla_dist."""

# Every folder under gorilla_dist/ and launcher/ is a package, with or without an __init__.py (a forgotten one
# would otherwise import in the checkout and be missing from the wheel). The two folders above hold data
# files only (see package-data in pyproject.toml).
packages = find_namespace_packages(include=["launcher", "launcher.*", "gorilla_dist", "gorilla_dist.*"],
                                   exclude=["*.__pycache__"])
setup(packages=[*packages, *LAYOUT], package_dir=LAYOUT)
