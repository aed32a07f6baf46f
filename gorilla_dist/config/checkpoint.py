"""checkpoint: saving, keeping, resuming, starting from another run; the checks of what a tool reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError


@dataclass
class CheckpointConfig:
    interval: int = 500
    """Save every this many steps (and always at the end); 0 saves only at the end."""
    keep: int = 2
    """Complete checkpoints to keep (oldest deleted first); 0 keeps all."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run.dir; never: start fresh
    (refuses if checkpoints exist); or the path of one checkpoint directory."""
    init_from: str | None = None
    """Fine-tuning: start this run from another run's weights — a checkpoint directory, or a run
    directory (its newest complete checkpoint). Any layout; the optimizer, LR schedule and data order
    start fresh. Only used when run.dir has no checkpoint to resume (a preempted fine-tune resumes itself)."""
    consolidated: str = "auto"
    """Besides the per-rank shards every checkpoint holds, also write the whole model's weights as one
    model.safetensors (rank 0, one tensor at a time, from the shards): true, false, or auto (when the
    fp32 weights are at most 2 GiB). Readers (resume, generate, export, consolidate) take either."""


def check_init_source(source: str) -> None:
    """checkpoint.init_from=<dir> (not hf:) holds a checkpoint: it is one (its manifest.json) or a run directory
    that saved one. The launcher checks it before start, the worker again when it loads it."""
    src = Path(source)
    if not src.is_dir():
        raise ConfigError(f"checkpoint.init_from={source!r}: no such directory; expected a run directory, one of "
                          "its checkpoints (run.dir/checkpoints/step_XXXXXXXX) or hf:<transformers directory>")
    if not (src / "manifest.json").is_file() and not has_checkpoints(src):
        raise ConfigError(f"checkpoint.init_from={source!r} holds no complete checkpoint (no manifest.json in it "
                          "or in checkpoints/step_*/); expected a run directory that saved one, or a checkpoint")


def check_checkpoint_source(run_dir: str | os.PathLike | None, which: str = "latest") -> None:
    """What generate / evaluate / export / consolidate read exists: a run directory (its config.yaml) and,
    for checkpoint=<dir>, that directory; torch-free, so the tools check it before importing torch.
    Whether a checkpoint is complete and intact is checkpoint.resolve_checkpoint's."""
    if which != "latest":
        if not Path(which).is_dir():
            raise ConfigError(f"checkpoint={which}: no such directory; expected one of a run's checkpoints "
                              "(run.dir/checkpoints/step_XXXXXXXX), or checkpoint=latest (the default)")
        return
    if run_dir is None:
        raise ConfigError("run.dir=<run directory> is required")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run.dir={run_dir}: no such directory")
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"run.dir={run_dir} is not a run directory (no config.yaml; runs are started with "
                          f"python -m launcher run.dir={run_dir})")


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """run_dir/checkpoints holds a finished save (its manifest.json is written last)."""
    return any(Path(run_dir).glob("checkpoints/step_*/manifest.json"))


def check_checkpoint(c) -> None:
    for key in ("interval", "keep"):
        positive(getattr(c, key), f"checkpoint.{key}", allow_zero=True)
    choice(str(c.consolidated).lower(), ("auto", "true", "false"), "checkpoint.consolidated")
