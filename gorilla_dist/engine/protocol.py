"""What the training loop, checkpoints and the memory report ask of an engine: the `TrainEngine` protocol and
the `StepResult` of one optimizer step.

An engine owns the model, its optimizer, its LR schedule and its precision, and runs one optimizer step over a
rank's micro-batches however it schedules them: `DeepSpeedEngine` (engine/deepspeed_engine.py) runs them one
after another through DeepSpeed; a pipeline engine would interleave them over its stages behind the same
methods. Its state goes in and out layout-free (single-process names, full tensors), so a checkpoint written
by one engine and layout resumes in any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch


@dataclass
class StepResult:
    """One optimizer step, as the loop needs it. Nothing here was read back to the host."""

    loss: torch.Tensor
    """Mean loss over this rank's micro-batches (0-d; not averaged over ranks)."""
    grad_norm: torch.Tensor | float | None
    """Global gradient norm before clipping (None when the engine measured none)."""
    skipped: torch.Tensor
    """0-d bool: the update was not applied (inf/NaN gradient norm): weights, optimizer and schedule
    unchanged. Decided on the device (engine/on_device.py); read it with the losses, not every step."""
    moe: torch.Tensor | None = None
    """Mixture of experts: this rank's router numbers for the step (moe.RouterStats.take); None when dense."""
    objectives: torch.Tensor | None = None
    """Several pretraining objectives: this rank's (summed loss, units, correct) of each, (objectives, 3)
    (train.train_step; None for one)."""
    loss_scale: float | None = None
    """fp16: the dynamic loss scale this step's backward used (a host number: DeepSpeed's scaler lives on
    the host); None for fp32/bf16."""


@runtime_checkable
class TrainEngine(Protocol):
    """The engine behind the loop (train.py), the checkpoints (checkpoint/) and the memory report (memory.py)."""

    router_stats: object | None
    """Mixture of experts: turns StepResult.moe into metrics (moe.RouterStats; None for a dense model)."""

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (its parameters this rank holds; single-process code: sampling, inspection)."""

    def __call__(self, *args, **kwargs):
        """Forward through the engine (what the engine needs around it, e.g. ZeRO-3's parameter gathering)."""

    def train(self) -> None: ...

    def eval(self) -> None: ...

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate the next step uses, 0-d on the device."""

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was not applied (reads the device)."""

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (applied or skipped)."""

    def step(self, micro_batches: list, loss_fn: Callable, *, probe=None) -> StepResult:
        """One optimizer step over this rank's micro-batches: `loss_fn(engine, batch)` -> 0-d loss for each
        (already divided so that the gradients summed over micro-batches and averaged over data-parallel
        ranks are the step's), backward, and the update; `probe` (memory.FirstStepProbe) measures the first
        step's memory. Nothing is read back to the host."""

    def evaluate_sums(self, batches: list, fn: Callable, width: int) -> torch.Tensor:
        """Forward only: the sum over `batches` of fn(engine, batch) (a tuple of `width` 0-d tensors), the same
        on every rank of a model copy (with pipeline stages: computed on the last, shared)."""

    def sampling_model(self) -> Callable:
        """What inference.sample calls for logits (the model, or the pipeline's forward)."""

    def full_state(self, *, keep: bool = True, trainable_only: bool = False) -> tuple[dict, dict, list[str]]:
        """(weights, optimizer moments, names of non-finite weights): full tensors under single-process
        names, gathered over the tensor-, expert- and data-parallel ranks (with pipeline stages: this
        stage's parameters)."""

    def local_state(self, *, trainable_only: bool = False) -> tuple[dict, dict, list[str]]:
        """This rank's own parts of the layout-free tensors (no communication)."""

    def schedule_state(self) -> dict:
        """The optimizer's step count, the LR schedule, the step counters, the loss scaler, as JSON."""

    def load_full_state(self, weights: dict, moments: dict, schedule: dict, *, fresh=frozenset()) -> None:
        """Load a layout-free state (`fresh`: names the source does not have, left as built)."""

    def optimizer_step_count(self) -> int: ...

    def check_fits(self, shapes: dict[str, tuple], source: str, *, fresh=frozenset()) -> None:
        """A CheckpointError unless `shapes` are this model's single-process names and shapes."""

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer state (memory.py)."""
