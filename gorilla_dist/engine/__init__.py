"""The engine boundary: the only package that knows DeepSpeed's and megatron-core's internals.

Everything that reads a private field of either library, replaces one of their functions or depends
on how they lay out their state lives here, each adaptation named and checked against the tested
versions (versions.py):
    protocol.py          what the loop asks of an engine: TrainEngine, StepResult
    versions.py          the DeepSpeed / megatron-core versions these were written for, checked at start
    comm.py              starting torch.distributed, through DeepSpeed for training (the version check; no shm
                         op on CPU); the census of live ranks after a failed collective
    startup.py           importing megatron-core without its import-time compile and W&B costs
    pipeline.py          the TrainEngine of a pipeline stage: the 1F1B schedule around DeepSpeed's backward and
                         step, the stages' point-to-point exchange, the tied embeddings' gradient sum
    deepspeed_engine.py  building the DeepSpeed engine and its adaptations (non-finite fp32 steps, the
                         unfused optimizer's init step, fp16's loss scale at ZeRO-0); the `mpu`; ZeRO-3's
                         partitioned construction (deepspeed.zero.Init)
    megatron_cpu.py      megatron-core's CUDA assumptions adapted for CPU; sequence-parallel grad sums
    output.py            heads at megatron's output step (a classifier's scores instead of the logits)
    moe.py               mixture of experts: aux-loss scaling, router statistics, the expert bias, expert
                         parallelism inside DeepSpeed
    rng.py               megatron's model-parallel RNG tracker: seeding, capture, restore
    state.py             the layout-free training state: full tensors out of / into any TP x ZeRO layout
    accounting.py        per-rank bytes of parameters, gradients and optimizer state
    on_device.py         the step's skip decision and LR schedule on the device (no host read per step)
    syncs.py             SyncCounter: the host syncs (by call site) and aten operations of a block of code

The rest of the framework talks to the `TrainEngine` protocol only (protocol.py: `step(micro_batches, loss_fn) ->
StepResult`, `full_state()` / `local_state()` / `load_full_state()`, `state_bytes()`, and the model to call
forward on); `DeepSpeedEngine` (deepspeed_engine.py) is its implementation, and `PipelineEngine` (pipeline.py) with
pipeline stages; `build_engine` makes one. Megatron-core
*layers* (the model spec) are built in gorilla_dist/model/ from megatron's public specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gorilla_dist.parallel import ParallelLayout

from gorilla_dist.config import OptimConfig, ParallelConfig, PrecisionConfig, TrainConfig
from gorilla_dist.engine import moe, state
from gorilla_dist.engine.protocol import StepResult, TrainEngine
from gorilla_dist.engine.versions import check_versions

__all__ = ["StepResult", "TrainEngine", "build_engine", "check_versions", "check_fits", "load_trained_buffers",
           "model_shapes", "partitioned_construction", "tp_join"]

check_fits = state.check_fits
load_trained_buffers = state.load_trained_buffers
model_shapes = state.model_shapes
tp_join = state.tp_join


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
    from gorilla_dist.engine.deepspeed_engine import DeepSpeedEngine, build_deepspeed

    engine = build_deepspeed(model, optim=optim, train=train, zero_stage=parallel.zero_stage, precision=precision,
                             layout=layout)
    router_stats = moe.RouterStats(engine.module, layout.device) if engine.module.config.num_moe_experts else None
    if layout.pp > 1:
        from gorilla_dist.engine.pipeline import PipelineEngine

        return PipelineEngine(engine, layout, router_stats)
    return DeepSpeedEngine(engine, router_stats)
