"""Entry point: `python -m launcher [group=option] [key=value ...]` (`--cfg job` prints the config);
`python -m launcher -m key=a,b ...` sweeps (launcher/sweep.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gorilla_dist import conf
from gorilla_dist.config import check_before_start, check_inputs, check_slurm_value, register_configs, resolve, save_run_config, validate
from gorilla_dist.errors import EXIT_PREEMPTED, UserError
from gorilla_dist.summary import OVERRIDES
from launcher import backends
from launcher.overrides import check_overrides

CONF_DIR = str(Path(conf.__file__).resolve().parent)  # conf/ in a checkout, gorilla_dist/conf when installed

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    """One run; with -m (Hydra's multirun: a sweep), one run per combination of the overrides, one after
    the other, each in <hydra.sweep.dir>/<job number> (launcher/sweep.py records them in sweep.json)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if sweep:
        cfg.run.dir = hydra_cfg.runtime.output_dir
    status = launch(cfg, list(hydra_cfg.overrides.task))
    if sweep:  # the next job runs; the sweep's end reports the failed ones
        return {"run_dir": str(cfg.run.dir), "status": status}
    sys.exit(status)


def launch(cfg: DictConfig, overrides: list[str]) -> int:
    """Check the config, write run.dir/config.yaml and overrides.json, start the backend; its exit status."""
    try:
        resolve(cfg)
        validate(cfg)
        check_inputs(cfg)
        check_before_start(cfg)
        if cfg.launch.backend == "slurm":  # sbatch --chdir=<it> in the job script
            check_slurm_value("the working directory", os.getcwd(), "run.dir")
    except UserError as err:
        print(f"config error: {err}", file=sys.stderr)
        return err.exit_code
    if cfg.finetune.trainable or cfg.finetune.frozen:  # regexes over the model's parameter names
        refused = check_selection(cfg)
        if refused:
            return refused
    path = save_run_config(cfg, cfg.run.dir)
    (Path(cfg.run.dir) / OVERRIDES).write_text(json.dumps(overrides) + "\n")
    if cfg.launch.backend == "slurm":
        from launcher import slurm

        return slurm.launch(cfg)
    try:
        backends.check_network(cfg)
    except UserError as err:
        print(f"[launcher] error: {err}", file=sys.stderr)
        return err.exit_code
    argv, env = backends.command(cfg, cfg.run.dir)
    nodes = f" on this node of {cfg.launch.nnodes}" if cfg.launch.nnodes > 1 else ""
    print(f"[launcher] {cfg.launch.backend}: {cfg.launch.nproc_per_node} worker(s){nodes}, config {path}", flush=True)
    return run_forwarding_signals(argv, env, backend=cfg.launch.backend, run_dir=cfg.run.dir)


def check_selection(cfg: DictConfig) -> int:
    """finetune.trainable / frozen checked against the run's model in a subprocess (gorilla_dist/finetune/
    check.py: the launcher itself never imports torch); its exit status, 0 when fine."""
    from omegaconf import OmegaConf

    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.finetune.check"], input=OmegaConf.to_yaml(cfg),
                          text=True, capture_output=True)
    if proc.returncode:
        error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        print(f"config error: {error[-1][len('error: '):]}" if error else proc.stderr, file=sys.stderr, end="\n")
    return proc.returncode


def run_forwarding_signals(argv: list[str], env: dict, *, backend: str, run_dir: str) -> int:
    """Run the backend command; SIGTERM/SIGINT/SIGUSR1 sent to the launcher (a scheduler, a kill, a
    preemption warning) reach the workers too instead of orphaning them. Returns the command's exit
    status (75: the workers stopped on a signal after saving a checkpoint).

    torchrun and the deepspeed launcher do not pass a stop on well: torchrun ends its workers' run with
    a traceback and exit 1, the deepspeed launcher kills them before they can save. So SIGTERM and
    SIGUSR1 go straight to the worker processes under them, which agree on a step, save and exit 75;
    the backend then fails, and the launcher reports 75 when a checkpoint was completed after the signal."""
    proc = subprocess.Popen(argv, env=env)
    stop_at: list[float] = []

    def forward(signum, _frame):
        targets, sig = [proc.pid], signum  # local: proc is the worker itself
        if signum != signal.SIGINT:
            stop_at.append(time.time())
            if backend != "local":
                targets = worker_pids(proc.pid) or [proc.pid]
                if targets == [proc.pid] and signum == signal.SIGUSR1:  # no worker yet: torchrun and the
                    sig = signal.SIGTERM  # deepspeed launcher die of SIGUSR1, SIGTERM they pass on
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    rc = proc.wait()
    rc = 128 - rc if rc < 0 else rc  # killed by signal N: 128+N, as a shell reports it
    if stop_at and rc not in (0, EXIT_PREEMPTED) and saved_since(run_dir, stop_at[0]):
        print(f"[launcher] the workers stopped on the signal and saved a checkpoint ({backend} exited {rc}); "
              f"exit {EXIT_PREEMPTED}: launch again to resume", file=sys.stderr, flush=True)
        rc = EXIT_PREEMPTED
    return rc


def worker_pids(root: int) -> list[int]:
    """Processes under `root` that run `python -m gorilla_dist.worker` (read from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the module a python process runs: torchrun and the deepspeed launchers name gorilla_dist.worker
        # in their own command lines too, and must not get the signal (they would end the workers)
        if b"-m" in argv and argv[argv.index(b"-m") + 1:argv.index(b"-m") + 2] == [b"gorilla_dist.worker"]:
            found.append(pid)
    return found


def saved_since(run_dir: str, since: float) -> bool:
    """A complete checkpoint (its manifest is written last) appeared in run_dir after `since`."""
    return any(m.stat().st_mtime >= since for m in Path(run_dir).glob("checkpoints/step_*/manifest.json"))


def check_command_line() -> None:
    """A typo'd key or option is one line, before Hydra composes (launcher/overrides.py)."""
    try:
        check_overrides(sys.argv[1:], CONF_DIR)
    except UserError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    check_command_line()
    main()
