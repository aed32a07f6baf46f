"""The engine boundary: the only package that knows DeepSpeed's and megatron-core's internals.

Everything that reads a private field of either library, replaces one of their functions or depends
on how they lay out their state lives here, each adaptation named and checked against the tested
versions (versions.py):
    versions.py          the DeepSpeed / megatron-core versions these were written for, checked at start
    comm.py              starting torch.distributed, through DeepSpeed for training (the version check; no shm
                         op on CPU); the census of live ranks after a failed collective
    startup.py           importing megatron-core without its import-time compile and W&B costs
    deepspeed_engine.py  building the DeepSpeed engine and its adaptations (non-finite fp32 steps, the
                         unfused optimizer's init step, fp16's loss scale at ZeRO-0); the `mpu`; ZeRO-3's
                         partitioned construction (deepspeed.zero.Init)
    megatron_cpu.py      megatron-core's CUDA assumptions adapted for CPU; sequence-parallel grad sums
    moe.py               mixture of experts: aux-loss scaling, router statistics, the expert bias, expert
                         parallelism inside DeepSpeed
    rng.py               megatron's model-parallel RNG tracker: seeding, capture, restore
    state.py             the layout-free training state: full tensors out of / into any TP x ZeRO layout
    accounting.py        per-rank bytes of parameters, gradients and optimizer state
    on_device.py         the step's skip decision and LR schedule on the device (no host read per step)
    syncs.py             SyncCounter: the host syncs (by call site) and aten operations of a block of code

The rest of the framework talks to `TrainEngine` only: `step(micro_batches, loss_fn) -> StepResult`,
`full_state()` / `local_state()` / `load_full_state()`, `state_bytes()`, and the model to call forward on. Megatron-core
*layers* (the model spec) are built in gorilla_dist/model/ from megatron's public specs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gorilla_dist.parallel import ParallelLayout

from gorilla_dist.config import OptimConfig, ParallelConfig, PrecisionConfig, TrainConfig
from gorilla_dist.engine import accounting, moe, state
from gorilla_dist.engine.versions import check_versions

__all__ = ["StepResult", "TrainEngine", "build_engine", "check_versions", "check_fits", "load_trained_buffers",
           "partitioned_construction", "tp_join"]

check_fits = state.check_fits
load_trained_buffers = state.load_trained_buffers
tp_join = state.tp_join


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


class TrainEngine:
    """A model inside DeepSpeed (ZeRO 0-3, fp32/bf16/fp16, accumulation, clipping), behind the narrow
    interface the loop, checkpoints and memory accounting use."""

    def __init__(self, ds_engine, router_stats: moe.RouterStats | None = None):
        self._ds = ds_engine
        self.router_stats = router_stats
        """Mixture of experts: turns StepResult.moe into metrics (None for a dense model)."""

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (single-process code: sampling, inspection)."""
        return self._ds.module

    def __call__(self, *args, **kwargs):
        """Forward through the engine (ZeRO-3 gathers the parameters it needs)."""
        return self._ds(*args, **kwargs)

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate the next step uses, 0-d on the device (the schedule advances inside a step)."""
        return self._ds.lr_scheduler.lr.clone()

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was not applied (reads the device)."""
        return state.skipped_steps(self._ds)

    @property
    def global_steps(self) -> int:
        return self._ds.global_steps

    def step(self, micro_batches, loss_fn, *, probe=None) -> StepResult:
        """One optimizer step over this rank's micro-batches: `loss_fn(self, batch)` -> 0-d loss for each,
        backward, and the update at the accumulation boundary (DeepSpeed divides by the accumulation
        count). `probe` (memory.FirstStepProbe) measures the first step's memory."""
        applied_before = self._ds.lr_scheduler.applied.clone()
        device = micro_batches[0].tokens.device
        total = torch.zeros((), device=device)
        scale = state.loss_scale(self._ds)
        if self.router_stats is not None:  # the aux losses' backward factor: the LM loss's (moe.py 1)
            moe.set_aux_loss_scale((scale or 1.0) / self._ds.gradient_accumulation_steps(), device)
        for i, batch in enumerate(micro_batches):
            with probe.micro_batch() if probe else nullcontext():
                loss = loss_fn(self, batch)
                self._ds.backward(loss)
            if probe and i == len(micro_batches) - 1:
                probe.before_update()
            self._ds.step()  # updates only at the accumulation boundary
            total += loss.detach().float()
        if probe:
            probe.after_update()
        stats = None
        if self.router_stats is not None:
            moe.update_expert_bias(self._ds.module)
            stats = self.router_stats.take(len(micro_batches))
        return StepResult(loss=total / len(micro_batches), grad_norm=state.unscaled_grad_norm(self._ds, scale),
                          skipped=self._ds.lr_scheduler.applied == applied_before, moe=stats, loss_scale=scale)

    def full_state(self, *, keep: bool = True, trainable_only: bool = False) -> tuple[dict, dict, list[str]]:
        """(weights, moments, non-finite weight names) under single-process names; see state.full_state."""
        return state.full_state(self._ds, keep=keep, trainable_only=trainable_only)

    def local_state(self, *, trainable_only: bool = False) -> tuple[dict, dict, list[str]]:
        """This rank's own parts of the layout-free tensors (no communication); see state.local_state."""
        return state.local_state(self._ds, trainable_only=trainable_only)

    def schedule_state(self) -> dict:
        """AdamW's step count, the LR schedule, the step counters, the loss scaler, as JSON."""
        return state.schedule_state(self._ds)

    def load_full_state(self, weights, moments, schedule: dict, *, fresh=frozenset()) -> None:
        """`fresh`: single-process names the source does not have, left as built (new adapters)."""
        state.load_full_state(self._ds, weights, moments, schedule, fresh=fresh)

    def optimizer_step_count(self) -> int:
        return state.optimizer_step_count(self._ds)

    def check_fits(self, shapes: dict[str, tuple], source: str, *, fresh=frozenset()) -> None:
        """A CheckpointError unless `shapes` are exactly this model's single-process names and shapes
        (but the names in `fresh`)."""
        state.check_fits(self._ds.module, shapes, source, fresh=fresh)

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of params, grads and optimizer state (see gorilla_dist/memory.py)."""
        return accounting.state_bytes(self._ds)


def partitioned_construction(model, parallel, precision):
    """ZeRO-3: the context build_model makes the model in, parameters partitioned as they are created
    (deepspeed_engine.partitioned_construction); None otherwise."""
    from gorilla_dist.engine.deepspeed_engine import partitioned_construction as construction

    return construction(model, parallel, precision)


def build_engine(model: torch.nn.Module, *, optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig,
                 precision: PrecisionConfig, layout: ParallelLayout) -> TrainEngine:
    """The model inside DeepSpeed: AdamW and its LR schedule (optim, train.max_steps), ZeRO
    (parallel.zero_stage), precision, clipping, accumulation (train's batch sizes over layout.dp). Each
    argument is one config section (OptimConfig, TrainConfig, ParallelConfig, PrecisionConfig)."""
    from gorilla_dist.engine.deepspeed_engine import build_deepspeed

    engine = build_deepspeed(model, optim=optim, train=train, zero_stage=parallel.zero_stage, precision=precision,
                             layout=layout)
    return TrainEngine(engine, moe.RouterStats(engine.module, layout.device) if moe.moe_layers(model) else None)
