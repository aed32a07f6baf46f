"""Test helpers: run the real launcher in a subprocess and read what the run wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Small, quiet runs on the CPU (also on a machine with a GPU): the `debug` model, no W&B, no progress bar, no
# end-of-run picture or sample.
QUICK = ["parallel.device=cpu", "model=debug", "logging.wandb.mode=disabled", "logging.progress=false", "logging.plot=false",
         "train.sample_tokens=0", "train.eval_interval=0", "train.log_interval=5"]


def composed(*overrides: str):
    """The config `python -m launcher <overrides>` would compose, resolved (not yet validated)."""
    from hydra import compose, initialize_config_dir

    from gorilla_dist.config import register_configs, resolve

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    resolve(cfg)
    return cfg


def launcher_args(run_dir: Path, *overrides: str, quick: bool = True) -> list[str]:
    return [sys.executable, "-m", "launcher", f"run.dir={run_dir}", *(QUICK if quick else []), *overrides]


def launch(run_dir: Path, *overrides: str, quick: bool = True, timeout: float = 600,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher run.dir=<run_dir> ...`; returns the finished process (stdout+stderr merged).
    `env`: extra environment variables (e.g. GORILLA_FAULT)."""
    return subprocess.run(launcher_args(run_dir, *overrides, quick=quick), cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def generate(run_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m gorilla_dist.generate run.dir=<run_dir> ...` (stdout and stderr kept apart); `env`: extra
    environment variables."""
    return subprocess.run([sys.executable, "-m", "gorilla_dist.generate", f"run.dir={run_dir}", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def registered_for_a_test(registry, cls):
    """Register plug-in `cls` in `registry` (kernels.registry.Registry) for the test, then remove it (other tests
    in this process see the built-in choices only)."""
    registry.register(cls)
    yield
    registry.registered.pop(cls.name)


def installed_plugin(tmp_path: Path, group: str, name: str, target: str) -> dict:
    """The environment of a process that sees `target` (module:attribute, from tests/unit) as an installed
    package's entry point `name` in `group`: a dist-info written under tmp_path, on PYTHONPATH with the tests."""
    site = tmp_path / "site"
    info = site / f"{name}_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {target}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO / "tests" / "unit"), str(REPO / "tests"),
                                           os.environ.get("PYTHONPATH", "")])}


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def metrics(run_dir: Path, memory: bool = False) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl; the per-rank memory rows only with memory=True."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows if memory else [r for r in rows if "memory" not in r]


def assert_no_host_syncs(run_dir: Path, min_steps: int = 5) -> None:
    """A run launched with logging.count_syncs=true read nothing back to the host in the steps between its
    log intervals (engine/on_device.py, metrics.py, stopping.py): summary.json's host_syncs."""
    report = json.loads((Path(run_dir) / "summary.json").read_text())["host_syncs"]
    assert report["steps_counted"] >= min_steps and report["per_step"] == 0, report


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}




def trained_model(world1, run_dir: Path):
    """(our model with the run's newest checkpoint loaded, in this process (TP=1, needs the world1 fixture),
    its tokenizer, its ModelConfig)."""
    from gorilla_dist.inference import checkpoint_model

    cfg, _, model, tok = checkpoint_model(run_dir, "latest", world1.device)
    return model, tok, cfg.model


def slurm_job(job_id: str, env: dict | None = None) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ...); `env`: e.g. SLURM_CONF of another cluster."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
