"""logging: W&B, the progress bar, MFU, plots, the host-sync counter."""

from __future__ import annotations

from dataclasses import dataclass, field

from gorilla_dist.config.checks import choice

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (files under run.dir/wandb, sync later) | online (needs WANDB_API_KEY) | disabled."""
    project: str = "gorilla_dist"
    entity: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on rank 0."""
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for MFU; None looks the device up in a small table (unknown: no MFU)."""
    plot: bool = True
    """At the end of a run draw run.dir/plot.png (python -m gorilla_dist.plot). The run's summary
    (run.dir/summary.json) is written either way, after a stop too."""
    count_syncs: bool = False
    """Count the host syncs (points where the host waits for a value from the device: .item(), .cpu(),
    a data-dependent shape) of the training steps between log intervals, by call site, into
    run.dir/summary.json `host_syncs`. None are expected; a diagnostic for a GPU that idles between
    kernels. It slows the counted steps (every operation is intercepted)."""


def check_logging(lg) -> None:
    choice(lg.wandb.mode, WANDB_MODES, "logging.wandb.mode")
