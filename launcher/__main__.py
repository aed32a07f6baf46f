"""Entry point: `python -m launcher [group=option] [key=value ...]` (`--cfg job` prints the config)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gorilla_dist import conf
from gorilla_dist.config import check_inputs, register_configs, resolve, save_run_config, validate
from gorilla_dist.errors import UserError
from launcher import backends

CONF_DIR = str(Path(conf.__file__).resolve().parent)  # conf/ in a checkout, gorilla_dist/conf when installed

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        resolve(cfg)
        validate(cfg)
        check_inputs(cfg)
    except UserError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    path = save_run_config(cfg, cfg.run.dir)
    if cfg.launch.backend == "slurm":
        from launcher import slurm

        sys.exit(slurm.launch(cfg))
    argv, env = backends.command(cfg, cfg.run.dir)
    print(f"[launcher] {cfg.launch.backend}: {cfg.launch.nproc_per_node} worker(s), config {path}", flush=True)
    sys.exit(run_forwarding_signals(argv, env, backend=cfg.launch.backend))


def run_forwarding_signals(argv: list[str], env: dict, *, backend: str) -> int:
    """Run the backend command; SIGTERM/SIGINT/SIGUSR1 sent to the launcher (a scheduler, a kill, a
    preemption warning) reach the workers too instead of orphaning them. Returns the command's exit
    status (75: the workers stopped on a signal after saving a checkpoint). torchrun and the deepspeed
    launcher die of SIGUSR1, so they get SIGTERM instead, which they pass on to their workers."""
    proc = subprocess.Popen(argv, env=env)

    def forward(signum, _frame):
        if signum == signal.SIGUSR1 and backend != "local":
            signum = signal.SIGTERM
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128+N, as a shell reports it


if __name__ == "__main__":
    main()
