"""Pictures of training runs, without W&B:
`python -m gorilla_dist.plot run.dir=A [run.dir=B ...] [sweep=<dir>] [out=plot.png]`.

One PNG: a row of panels per quantity — training loss (raw, faint, and smoothed), validation loss,
learning rate, gradient norm, tokens/s, and when the runs logged them each objective's loss and the
MoE routers' load — against the step (left column) and against the tokens seen (right column: step x
train.global_batch_size x model.seq_length, from the run's config.yaml). Several runs share one figure,
one colour each; the legend names each run (its directory) and the overrides in which the runs differ.
`sweep=<dir>` takes the runs a sweep wrote there (sweep.json). Without `out=`, one run's picture goes
to run.dir/plot.png and several runs' to plot.png in the current directory. Training writes
run.dir/plot.png itself at its end (train.plot=true).

matplotlib draws with its non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gorilla_dist.errors import DataError, UserError

SMOOTHING = 0.9
"""Weight of the past in the training loss's exponential moving average (TensorBoard's slider)."""


@dataclass
class PlotArgs:
    run_dir: list[str] = field(default_factory=list)
    """Run directories (run.dir=A run.dir=B, or run.dir=A,B)."""
    sweep: str | None = None
    """A sweep directory (python -m launcher -m ...): every run it lists."""
    out: str | None = None
    """The PNG to write (default: run.dir/plot.png for one run, ./plot.png for several)."""


@dataclass
class Run:
    name: str
    steps: list[dict]  # training rows (with "loss")
    evals: list[dict]  # rows with "val_loss"
    tokens_per_step: int
    config: dict


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; one clear error for a missing, empty or malformed file."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"run.dir={run_dir}: no such directory")
    if not path.is_file():
        raise DataError(f"{path}: not there; a run writes it from its first logged step (train.log_interval)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not a JSON row ({err.msg}); metrics.jsonl is written by training, "
                            "one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{i}: a row without an integer 'step'")
        rows.append(row)
    return rows


def load_run(run_dir: Path) -> Run:
    rows = read_metrics(run_dir)
    steps = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    if len(steps) < 2:
        raise DataError(f"{run_dir / 'metrics.jsonl'}: {len(steps)} training step(s) logged; a curve needs two or "
                        "more (train for longer, or lower train.log_interval)")
    config = {}
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    train, model = config.get("train", {}), config.get("model", {})
    tokens = int(train.get("global_batch_size") or 0) * int(model.get("seq_length") or 0)
    return Run(run_dir.name or str(run_dir), steps, [r for r in rows if "val_loss" in r], tokens, config)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def differences(runs: list[Run]) -> list[str]:
    """Each run's label: its name and the config values in which the runs differ (run.dir, run.name and
    paths left out), at most four."""
    flats = [_flat(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    skip = ("run.dir", "run.name", "data.path", "checkpoint.init_from")
    differ = [k for k in keys if k not in skip and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    labels = []
    for run, f in zip(runs, flats):
        parts = [f"{k}={_short(f.get(k))}" for k in differ[:4]]
        labels.append(run.name + (f" ({', '.join(parts)})" if parts else ""))
    return labels


def _short(value) -> str:
    """A config value for a legend: objectives / sources as name:weight, anything else cut at 40 characters."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "weight" in v for v in value):
        return "+".join(f"{v.get('name') or Path(str(v.get('path'))).name}:{v['weight']:g}" for v in value)
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def panels(runs: list[Run]) -> list[tuple[str, list[str], str]]:
    """(title, metric keys, which rows: "steps" | "evals") of the panels these runs have data for."""
    have = {k for r in runs for row in r.steps + r.evals for k, v in row.items() if isinstance(v, (int, float))}
    out = [("training loss", ["loss"], "steps")]
    if "val_loss" in have:
        out.append(("validation loss", ["val_loss"], "evals"))
    out += [(title, [key], "steps") for title, key in (("learning rate", "lr"), ("gradient norm", "grad_norm"),
                                                        ("tokens/s", "tokens_per_s")) if key in have]
    objective = sorted(k for k in have if k.startswith("loss_"))
    if objective:
        out.append(("loss per objective", objective, "steps"))
    moe = [k for k in ("moe_load_max", "moe_load_min") if k in have]
    if moe:
        out.append(("MoE load (max, min; 1 = uniform)", moe, "steps"))
    return out


def plot(runs: list[Run], out: Path) -> dict:
    """Draw and save; returns {"path", "panels": titles, "labels"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = panels(runs)
    labels = differences(runs)
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 2.6 * len(rows)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (title, keys, which) in enumerate(rows):
        for j, axis in enumerate(("step", "tokens seen")):
            ax = axes[i][j]
            for n, (run, label) in enumerate(zip(runs, labels)):
                data = run.steps if which == "steps" else run.evals
                for m, key in enumerate(keys):
                    pts = [(r["step"], r[key]) for r in data if isinstance(r.get(key), (int, float))
                           and math.isfinite(r[key])]
                    if not pts:
                        continue
                    xs = [s if j == 0 else s * run.tokens_per_step for s, _ in pts]
                    ys = [v for _, v in pts]
                    color = colors[(n * max(len(keys), 1) + m) % len(colors)]
                    name = label if len(keys) == 1 else f"{label}: {key.removeprefix('loss_')}"
                    if key.startswith("loss"):  # raw, faint, under its moving average
                        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                        ax.plot(xs, smooth(ys), color=color, label=name)
                    else:
                        ax.plot(xs, ys, color=color, label=name, marker="o" if which == "evals" else None,
                                markersize=3)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(axis, fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if len(keys) > 1 and j == 0:
                ax.legend(fontsize=7, frameon=False)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 2), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return {"path": str(out), "panels": [t for t, _, _ in rows], "labels": labels}


def sweep_runs(sweep: Path) -> list[Path]:
    listing = sweep / "sweep.json"
    if not listing.is_file():
        raise UserError(f"sweep={sweep}: no sweep.json there (python -m launcher -m ... writes it in the sweep "
                        "directory)")
    jobs = json.loads(listing.read_text())["jobs"]
    return [Path(j["run_dir"]) for j in jobs]


def main(argv: list[str]) -> int:
    from gorilla_dist.cli import parse_key_values, run_tool

    def body() -> int:
        args = parse_key_values(argv, PlotArgs, aliases={"run.dir": "run_dir"}, lists=("run_dir",))
        dirs = [Path(d) for d in args.run_dir] + (sweep_runs(Path(args.sweep)) if args.sweep else [])
        if not dirs:
            raise UserError("nothing to plot: give run.dir=<run directory> (one or more) or sweep=<sweep directory>")
        runs = [load_run(d) for d in dirs]
        default = dirs[0] / "plot.png" if len(dirs) == 1 else (Path(args.sweep) if args.sweep else Path(".")) / "plot.png"
        result = plot(runs, Path(args.out) if args.out else default)
        print(f"[plot] {result['path']}: {len(result['panels'])} panels ({', '.join(result['panels'])}) for "
              f"{', '.join(result['labels'])}")
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
