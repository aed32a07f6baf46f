"""launch=slurm: write run.dir/train.sbatch from slurm/train.sbatch, submit it with sbatch, and (with
slurm.wait=true) follow the job's log across requeues until it ends."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gorilla_dist.slurm
from gorilla_dist.config import slurm_job_name
from gorilla_dist.files import write_text_atomic

TEMPLATE = Path(gorilla_dist.slurm.__file__).resolve().parent / "train.sbatch"  # slurm/ in a checkout
# JobState values after which a job will not run again (a requeued job goes back to PENDING instead)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT"}


class SlurmError(Exception):
    pass


def sbatch_options(cfg) -> list[str]:
    s, run_dir = cfg.slurm, cfg.run.dir
    if s.min_nodes in (None, s.nodes):
        size = [f"--nodes={s.nodes}", f"--ntasks-per-node={cfg.launch.nproc_per_node}"]
    else:
        # A node range: Slurm gives the most nodes free at start only to a job that asks for whole nodes
        # and leaves the task count open (with --ntasks-per-node it derives the tasks from the minimum and
        # allocates the minimum); srun then starts launch.nproc_per_node tasks on each node it got.
        size = [f"--nodes={s.min_nodes}-{s.nodes}", "--exclusive"]
    opts = [f"--job-name={slurm_job_name(cfg)}", *size, f"--output={run_dir}/slurm-%j.out",
            "--open-mode=append", f"--chdir={os.getcwd()}", f"--signal=USR1@{s.signal_seconds}"]
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("cpus_per_task", "partition", "account", "time"):
        if s[key] is not None:
            opts.append(f"--{key.replace('_', '-')}={s[key]}")
    opts.append("--requeue" if s.requeue or s.requeue_on_failure else "--no-requeue")
    return opts + list(s.extra)


def render(cfg, python: str = sys.executable) -> str:
    fields = {"SBATCH_OPTIONS": "\n".join(f"#SBATCH {opt}" for opt in sbatch_options(cfg)),
              "RUN_DIR": shlex.quote(cfg.run.dir), "REQUEUE": "true" if cfg.slurm.requeue else "false",
              "REQUEUE_ON_FAILURE": "true" if cfg.slurm.requeue_on_failure else "false",
              "MAX_RESTARTS": str(int(cfg.slurm.max_restarts)),
              "TASKS_PER_NODE": str(int(cfg.launch.nproc_per_node)),
              "PYTHON": shlex.quote(python)}
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace(f"@{key}@", value)
    return text


def _scheduler_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"`{name}` was not found on PATH: launch=slurm runs on a Slurm login node "
                         "(or try it locally with `bash slurm/dev_cluster.sh`)")
    return path


def submit(script: Path) -> str:
    proc = subprocess.run([_scheduler_command("sbatch"), "--parsable", str(script)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); None once Slurm forgot the job."""
    proc = subprocess.run([_scheduler_command("scontrol"), "show", "job", "-o", job_id], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return None
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def follow(job_id: str, log: Path, *, poll_s: float = 1.0) -> int:
    """Print the job's log as it grows until the job ends; its exit status (requeues are followed)."""
    offset, restarts = 0, "0"
    while True:
        info = job_info(job_id)
        if log.is_file():
            with log.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if info is None:
            print(f"[launcher] job {job_id} is no longer known to Slurm; its log is {log}")
            return 1
        if info.get("Restarts", "0") != restarts:
            restarts = info["Restarts"]
            print(f"[launcher] job {job_id} was requeued (restart {restarts}); state {info.get('JobState')}",
                  flush=True)
        if info.get("JobState") in FINAL_STATES:
            code = int(info.get("ExitCode", "1:0").split(":")[0])
            print(f"[launcher] job {job_id} ended: {info['JobState']}, exit {code}", flush=True)
            return code if info["JobState"] != "COMPLETED" or code else 0
        time.sleep(poll_s)


def launch(cfg) -> int:
    script = Path(cfg.run.dir) / "train.sbatch"
    write_text_atomic(script, render(cfg))
    if not cfg.slurm.submit:
        print(f"[launcher] wrote {script}; submit it with: sbatch {script}")
        return 0
    try:
        job_id = submit(script)
    except SlurmError as err:
        print(f"[launcher] error: {err}", file=sys.stderr)
        return 1
    log = Path(cfg.run.dir) / f"slurm-{job_id}.out"
    print(f"[launcher] submitted job {job_id} ({script}); log: {log}", flush=True)
    return follow(job_id, log) if cfg.slurm.wait else 0
