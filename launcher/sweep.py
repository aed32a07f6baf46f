"""Sweeps: `python -m launcher -m optim.lr=1e-3,3e-4 model=tiny,small` runs every combination (Hydra's
multirun), one after the other, each in its own run.dir, <hydra.sweep.dir>/<job number> (default
sweeps/<date_time>/0, 1, ...). With launch=slurm each job is submitted instead and the sweep returns
once all are queued (they then run in parallel).

`SweepRecord` (a Hydra callback, conf/config.yaml) keeps <sweep dir>/sweep.json: per job its number,
overrides, run.dir, launcher exit status and final metrics (from the run's summary.json: final and best
val loss, final training loss, steps; none for a queued Slurm job), updated as each job ends. At the
end it prints the table, the command that draws the runs side by side, and exits 1 when a job failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

FINAL = ("steps", "final_loss", "final_val_loss", "best_val_loss", "best_val_step", "mean_tokens_per_s")
"""What sweep.json copies from each run's summary.json."""


def _listing(config) -> Path:
    return Path(config.hydra.sweep.dir).absolute() / "sweep.json"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"jobs": []}


class SweepRecord(Callback):
    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        done = job_return.status == JobStatus.COMPLETED
        value = job_return.return_value if done else None
        run_dir = Path(value["run_dir"]) if value else Path(config.hydra.runtime.output_dir)
        summary = run_dir / "summary.json"
        final = json.loads(summary.read_text()) if summary.is_file() else {}
        entry = {"num": int(config.hydra.job.num), "overrides": list(job_return.overrides or []),
                 "run_dir": str(run_dir.absolute()), "status": value["status"] if value else 1,
                 "final": {k: final.get(k) for k in FINAL} if final else None}
        path = _listing(config)
        listing = _read(path)  # a sweep dir used again keeps its other jobs
        listing["jobs"] = sorted([j for j in listing["jobs"] if j["run_dir"] != entry["run_dir"]] + [entry],
                                 key=lambda j: j["num"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(listing, indent=1) + "\n")
        tmp.replace(path)

    def on_multirun_end(self, config, **kwargs) -> None:
        path = _listing(config)
        jobs = _read(path)["jobs"]
        print(f"[sweep] {len(jobs)} job(s), {path}:")
        common = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
        for j in jobs:
            final = j["final"] or {}
            val = final.get("final_val_loss")
            result = f"val_loss {val:.4f}" if val is not None else (
                f"loss {final['final_loss']:.4f}" if final.get("final_loss") is not None else "no metrics yet")
            swept = " ".join(o for o in j["overrides"] if o not in common)
            print(f"  #{j['num']} {swept}: exit {j['status']}, {result}  ({j['run_dir']})")
        print(f"[sweep] compare them: python -m gorilla_dist.plot sweep={path.parent}")
        failed = [j["num"] for j in jobs if j["status"] not in (0,)]
        if failed:
            print(f"[sweep] job(s) {failed} failed", file=sys.stderr)
            sys.exit(1)
