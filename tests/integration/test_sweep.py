"""A sweep through the launcher (Hydra's -m): two learning rates on the debug model run one after the
other, each in <sweep dir>/<job>; sweep.json lists both with their overrides and final numbers, which
equal each run's metrics.jsonl; each run leaves plot.png and a summary.json whose numbers a
recomputation from metrics.jsonl gives; the plot command compares the sweep's runs."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, check, metrics
from omegaconf import OmegaConf

RUN = ["model=debug", "logging.wandb.mode=disabled", "logging.progress=false", "train.sample_tokens=0",
       "train.max_steps=6", "train.log_interval=2", "train.eval_interval=3", "train.eval_samples=12"]


def test_a_two_job_sweep_records_runs_pictures_and_summaries(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "launcher", "-m", *RUN, "optim.lr=1e-3,3e-3",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    out = check(proc)
    assert "[sweep] 2 job(s)" in out and f"python -m gorilla_dist.plot sweep={sweep}" in out
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert [j["num"] for j in jobs] == [0, 1] and [j["status"] for j in jobs] == [0, 0]
    assert [j["overrides"][-1] for j in jobs] == ["optim.lr=0.001", "optim.lr=0.003"]
    for j in jobs:
        run = sweep / str(j["num"])
        assert j["run_dir"] == str(run)
        rows = metrics(run, memory=True)
        steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
        assert j["final"]["final_val_loss"] == evals[-1]["val_loss"] and j["final"]["final_loss"] == steps[-1]["loss"]
        summary = json.loads((run / "summary.json").read_text())
        cfg = OmegaConf.load(run / "config.yaml")
        assert summary["steps"] == 6 and summary["finished"]
        assert summary["tokens_seen"] == 6 * cfg.train.global_batch_size * cfg.model.seq_length
        assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
        assert summary["mean_tokens_per_s"] == sum(r["tokens_per_s"] for r in steps) / len(steps)
        first = [r for r in rows if r.get("memory") == "first_step"][-1]["ranks"][0]
        assert summary["peak_memory"][0]["total"] == sum(first.values())
        assert summary["overrides"][-1] == j["overrides"][-1]
        wall = summary["wall_s"]
        assert wall["total"] >= wall["startup"] + wall["training"] > 0
        assert (run / "plot.png").stat().st_size > 10_000
    assert jobs[0]["final"]["final_val_loss"] != jobs[1]["final"]["final_val_loss"]
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.plot", f"sweep={sweep}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "0 (optim.lr=0.001), 1 (optim.lr=0.003)" in proc.stdout and (sweep / "plot.png").is_file()
