"""A non-editable install (`pip install .`) carries everything a run needs — config groups, the Slurm job
template, the kernels, the bundled corpus — and trains from a directory that is not the checkout."""

import os
import shutil
import subprocess
import sys

from helpers import REPO, QUICK


def test_a_non_editable_install_trains_from_another_directory(tmp_path):
    site, elsewhere, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    # a copy of the checkout: pip builds in the source tree, and a build/ left there would be reused
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "runs", "wandb", "outputs", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = site / "gorilla_dist"
    for shipped in ("conf/config.yaml", "conf/model/debug.yaml", "slurm/train.sbatch", "kernels/limits.py",
                    "engine/state.py", "checkpoint/__main__.py", "data/tinyshakespeare.txt"):
        assert (installed / shipped).is_file(), shipped
    # the installed copy comes first on the path (before this checkout's editable install)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    where = subprocess.run([sys.executable, "-c", "import gorilla_dist.kernels, launcher.slurm as s; "
                            "print(gorilla_dist.kernels.__file__); print(s.TEMPLATE)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.split() == [str(installed / "kernels" / "__init__.py"), str(installed / "slurm" / "train.sbatch")]
    run = subprocess.run([sys.executable, "-m", "launcher", "train.max_steps=5", f"run.dir={tmp_path / 'x'}", *QUICK],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "x" / "checkpoints" / "step_00000005" / "manifest.json").is_file()
