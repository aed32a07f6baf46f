"""One training run through `python -m launcher` for the training benchmarks (moe.py, sharing.py,
sparse_training.py): model=tiny, no W&B, no progress bar, no sample, no checkpoint but the last."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(name: str, overrides: list[str], *, steps: int, eval_interval: int, workdir: Path) -> tuple[list[dict], float]:
    """(the run's metrics.jsonl rows, wall seconds); exits with the run's output if it fails."""
    run_dir = workdir / re.sub(r"[^A-Za-z0-9]+", "_", name)  # no '=', '+' or '(': Hydra would parse them
    cmd = [sys.executable, "-m", "launcher", f"run.dir={run_dir}", "model=tiny", f"train.max_steps={steps}",
           f"train.eval_interval={eval_interval}", "train.sample_tokens=0", "checkpoint.interval=0",
           "logging.wandb.mode=disabled", "logging.progress=false", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stdout[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], wall
