"""The wheel a user gets from `pip install .` holds every module and data file of the source tree, and trains
from a directory outside the checkout in an environment where the checkout cannot be imported.

The environment: a new virtual environment whose site-packages holds the wheel only, plus a .pth line naming
this suite's site-packages for the dependencies. A .pth line adds a directory to sys.path but does not run
the .pth files inside it, so the checkout's editable install (its import finder serves any subpackage from
the checkout, including ones the wheel lacks) is inactive there; the test checks that too.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import QUICK, REPO

SHIPPED = {"gorilla_dist": "gorilla_dist", "launcher": "launcher", "conf": "gorilla_dist/conf",
           "slurm": "gorilla_dist/slurm"}
"""Checkout folder -> where its files are in the wheel (pyproject.toml / setup.py)."""


def source_files() -> dict[str, str]:
    """Every file of the shipped folders -> its path in the wheel."""
    out = {}
    for folder, target in SHIPPED.items():
        for f in (REPO / folder).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                out[str(f.relative_to(REPO))] = f"{target}/{f.relative_to(REPO / folder)}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    # pip builds in the source tree; a copy keeps build/ and *.egg-info out of the checkout
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "runs", "wandb", "outputs", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [whl] = (root / "dist").glob("gorilla_dist-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its python."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    env_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (env_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                          capture_output=True, text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = source_files()
    assert len(expected) > 90 and "gorilla_dist/finetune/__init__.py" in expected.values()
    missing = sorted(src for src, dst in expected.items() if dst not in names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)  # nothing top-level but ours


def test_the_installed_package_trains_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run_installed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """The installed package's python, from a directory outside the checkout."""
        return subprocess.run([str(installed), *args], cwd=elsewhere, env=clean_env(), capture_output=True,
                              text=True, timeout=timeout)

    probe = run_installed("-c", "import sys, gorilla_dist, launcher.slurm as s, gorilla_dist.kernels as k;"
                          "print(gorilla_dist.__file__); print(s.TEMPLATE); print(k.__file__);"
                          "print(any(type(f).__name__ == '_EditableFinder' for f in sys.meta_path))", timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    package, template, kernels, editable = probe.stdout.split()
    site_dir = installed.parent.parent
    assert Path(package).is_relative_to(site_dir) and Path(kernels).is_relative_to(site_dir), probe.stdout
    assert Path(template).is_relative_to(site_dir) and Path(template).name == "train.sbatch"
    assert editable == "False"
    base = tmp_path / "base"
    run = run_installed("-m", "launcher", "train.max_steps=5", "checkpoint.interval=5", f"run.dir={base}", *QUICK)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (base / "checkpoints" / "step_00000005" / "manifest.json").is_file()
    # a LoRA fine-tune of that run with an objective mixture (the finetune and objectives packages)
    tuned = tmp_path / "tuned"
    run = run_installed("-m", "launcher", "train.max_steps=4", f"run.dir={tuned}", *QUICK, f"checkpoint.init_from={base}",
                        "finetune.method=lora", "finetune.lora.rank=2",
                        "train.objectives=[{name: clm, weight: 0.5}, {name: contrastive, weight: 0.5}]")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[finetune] lora: rank 2 adapters" in run.stdout
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_contrastive" in r and "loss_clm" in r] == [1, 2, 3, 4]
