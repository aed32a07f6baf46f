"""run: where the run lives and its seed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints/, data cache, W&B files."""
    seed: int = 1337
    """Seeds model init, data order and dropout; a run is a deterministic function of its config."""
    name: str | None = None
    """Human-readable run name (W&B); defaults to the run directory's name."""
