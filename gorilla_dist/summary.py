"""run.dir/summary.json: one file that says how a run went, written by rank 0 at its end and after a stop.

    steps, max_steps, finished      where it stands (finished: reached train.max_steps)
    final_loss                      the last logged training loss
    final_val_loss, best_val_loss, best_val_step
    tokens_seen                     steps x train.global_batch_size x model.seq_length
    mean_tokens_per_s, mean_mfu     over every logged step (all sessions of a resumed run)
    wall_s                          this session: start-up (process start to the first step), training,
                                    eval, checkpoint, total
    peak_memory                     per rank, the bytes of the last first-step memory report (params,
                                    grads, optimizer, activation peak) and their total
    git_commit                      of the source tree the run used (None outside a git checkout)
    overrides                       the launcher's command-line overrides (run.dir/overrides.json)

Everything but wall_s is recomputed from metrics.jsonl and config.yaml, so it matches them by
construction (tests recompute it independently).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

OVERRIDES = "overrides.json"
"""The launcher's command-line overrides, written next to config.yaml."""


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 where that is not available)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def summarize(rows: list[dict], *, tokens_per_step: int, max_steps: int) -> dict:
    """The metrics part of the summary, from metrics.jsonl's rows."""
    steps = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    last = max((r["step"] for r in steps), default=0)
    out = {"steps": last, "max_steps": max_steps, "finished": last >= max_steps,
           "final_loss": steps[-1]["loss"] if steps else None,
           "final_val_loss": evals[-1]["val_loss"] if evals else None,
           "best_val_loss": None, "best_val_step": None, "tokens_seen": last * tokens_per_step}
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        out["best_val_loss"], out["best_val_step"] = best["val_loss"], best["step"]
    speeds = [r["tokens_per_s"] for r in steps if isinstance(r.get("tokens_per_s"), (int, float))]
    out["mean_tokens_per_s"] = sum(speeds) / len(speeds) if speeds else None
    mfu = [r["mfu"] for r in steps if isinstance(r.get("mfu"), (int, float))]
    out["mean_mfu"] = sum(mfu) / len(mfu) if mfu else None
    # skipped updates: fp16 loss-scale overflows apart from the rest (non-finite loss or gradients)
    out["skipped_steps"] = sum(1 for r in steps if r.get("skipped") and not r.get("overflow"))
    out["overflow_steps"] = sum(1 for r in steps if r.get("overflow"))
    reports = [r for r in rows if r.get("memory") == "first_step"]
    out["peak_memory"] = ([{**rank, "total": sum(rank.values())} for rank in reports[-1]["ranks"]]
                          if reports else None)
    return out


def write_summary(cfg, wall_s: dict[str, float], *, host_syncs: dict | None = None) -> dict:
    """Write run.dir/summary.json (rank 0); returns it. `host_syncs`: logging.count_syncs's report."""
    from gorilla_dist.files import write_text_atomic
    from gorilla_dist.plot import read_metrics

    run_dir = Path(cfg.run.dir)
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    summary = summarize(rows, tokens_per_step=cfg.train.global_batch_size * cfg.model.seq_length,
                        max_steps=cfg.train.max_steps)
    overrides = run_dir / OVERRIDES
    summary.update(wall_s={k: round(v, 3) for k, v in wall_s.items()}, git_commit=git_commit(),
                   overrides=json.loads(overrides.read_text()) if overrides.is_file() else None,
                   written=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if host_syncs is not None:
        summary["host_syncs"] = host_syncs
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
