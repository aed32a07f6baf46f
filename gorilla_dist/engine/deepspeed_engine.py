"""Building the DeepSpeed engine, and the adaptations of DeepSpeed our training relies on (written
against DeepSpeed 0.19.8, see versions.py), each named:

1. `_measure_fp32_norm`: fp32 ZeRO-0 keeps the gradient norm (replaces `engine.clip_fp32_gradients`
   and wraps `optimizer.step`), so that a step whose norm is inf/NaN is skipped as on every other path.
5. `on_device.decide_on_device`: the skip decision and the LR schedule stay on the device (fused AdamW's
   `found_inf`, a table indexed by a device step counter) instead of DeepSpeed's host reads.
2. `_undo_unfused_init_step`: undoes the zero-gradient AdamW step DeepSpeed's FP16_UnfusedOptimizer
   (bf16/fp16 at ZeRO-0) takes at start.
3. bf16 at ZeRO-1 accumulates gradients in fp32 (`data_types.grad_accum_dtype`; a config choice).
4. One data-parallel rank at ZeRO-0: no gradient all-reduce over a group of one.
6. `_scale_fp16_zero0_loss`: fp16 at ZeRO-0 multiplies the loss by the loss scale before backward
   (DeepSpeed 0.19.8 scales it for ZeRO optimizers only; DeepSpeed PR #8393).
7. `_fp16_zero0_norm`: fp16 at ZeRO-0 hands FP16_UnfusedOptimizer's norm the gradients with their parameters'
   marks: it passed the bare gradient tensors to DeepSpeed's `get_weight_norm`, which then counted the last
   pipeline stage's copy of tied embeddings twice (measured 1.251 instead of 1.040) and, at TP > 1, left out
   every gradient of the tensor-parallel ranks but the first (0.885 instead of 1.040): clipping by a wrong norm.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from gorilla_dist.config import grad_accum_steps
from gorilla_dist.engine import accounting, moe, state
from gorilla_dist.engine.on_device import DeviceSchedule, decide_on_device, global_grad_norm
from gorilla_dist.engine.protocol import StepResult
from gorilla_dist.engine.state import unfused_masters
from gorilla_dist.errors import ConfigError
from gorilla_dist.optim import lr_at, param_groups


class DeepSpeedEngine:
    """The TrainEngine of a model inside DeepSpeed (ZeRO 0-3, fp32/bf16/fp16, accumulation, clipping)."""

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

    def evaluate_sums(self, batches, fn, width: int) -> torch.Tensor:
        """Forward only: the sum over `batches` of fn(self, batch), a tuple of `width` 0-d tensors."""
        return torch.stack([torch.stack(fn(self, b)) for b in batches]).sum(0)

    def sampling_model(self):
        """What inference.sample calls for logits: the model itself."""
        return self._ds.module

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


class MegatronMPU:
    """The `mpu` object DeepSpeed asks for, answered from megatron-core's parallel_state so both libraries
    agree on the groups. DeepSpeed's convention (utils/groups.py): the model-parallel *rank* is the
    tensor-parallel rank (it counts a tensor that TP does not split on TP rank 0 only), and its gradient norms
    are summed over the model-parallel *group*: here megatron's, every tensor- and pipeline-parallel rank of
    one model copy (the tensor-parallel group when pp == 1)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size() * self._ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()


def deepspeed_config(*, optim, train, zero_stage: int, precision, dp: int) -> dict:
    """DeepSpeed's config from our sections (OptimConfig, TrainConfig, PrecisionConfig)."""
    dtype = precision.dtype
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(train, dp),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bf16"},
        # bf16 with ZeRO-1: fp32 gradient accumulation (DeepSpeed's BF16_Optimizer; its default accumulates
        # in bf16). DeepSpeed 0.19.8 has no fp32 accumulation for bf16 at ZeRO-0 ("unsupported mix").
        **({"data_types": {"grad_accum_dtype": "fp32"}} if dtype == "bf16" and zero_stage == 1 else {}),
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0,
                 "initial_scale_power": precision.initial_scale_power,
                 "loss_scale_window": precision.loss_scale_window},
        # We bring torch's AdamW (no JIT-compiled fused op on CPU); DeepSpeed calls it "untested" for ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the device in every forward and step
        # (runtime/engine.py: tput_timer.start/stop -> accelerator.synchronize()); we measure tokens/s ourselves
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def partitioned_construction(model, parallel, precision):
    """ZeRO-3: the context build_model creates the megatron model in, `deepspeed.zero.Init`: each module's
    parameters are partitioned over the data-parallel group as soon as the module is made (after megatron
    has initialised them, so the initial weights are today's: tests/unit/test_zero3_init.py), so no rank
    ever holds the whole model; None otherwise. Not for models whose weights build_model rewrites after
    construction (experts seeded per expert, layers shared between depths): those are built whole and
    partitioned by deepspeed.initialize, as before."""
    if parallel.zero_stage != 3 or model.moe.num_experts or model.sharing.unique_layers not in (None, model.num_layers):
        return None
    import deepspeed
    from megatron.core import parallel_state as ps

    # the dtype goes through the config: Init's own `dtype` argument is overridden on machines without fp16
    # (DeepSpeed 0.19.8 partition_parameters.py _set_dtype: `dtype or fp16 if ... else bf16 if ...`); the batch
    # size only satisfies DeepSpeed's config parser. mem_efficient_linear=False: Init would otherwise replace
    # torch.nn.functional.linear process-wide.
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
              "bf16": {"enabled": precision.dtype == "bf16"}, "fp16": {"enabled": precision.dtype == "fp16"}}
    return deepspeed.zero.Init(config_dict_or_path=config, mpu=MegatronMPU(), mem_efficient_linear=False,
                               data_parallel_group=ps.get_data_parallel_group())


def build_deepspeed(model: torch.nn.Module, *, optim, train, zero_stage: int, precision, layout):
    """deepspeed.initialize: AdamW (decay on matrices only), warmup + cosine schedule over
    train.max_steps, ZeRO, precision, clipping, accumulation; with the adaptations above applied."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if precision.dtype == "fp16" and not acc.is_fp16_supported():
        raise ConfigError(f"precision.dtype=fp16 is not supported on this device ({acc.device_name()}): "
                          "DeepSpeed has fp16 training on GPUs only; use precision=bf16 or precision=fp32")

    from gorilla_dist.engine.moe import deepspeed_expert_groups, optimizer_groups

    o = optim
    config = deepspeed_config(optim=optim, train=train, zero_stage=zero_stage, precision=precision, dp=layout.dp)
    with deepspeed_expert_groups(model, layout.ep):
        # fused: one multi-tensor kernel per parameter group, and no host read of the step count (torch's
        # per-parameter AdamW reads each parameter's step with .item(): a host sync per parameter)
        optimizer = torch.optim.AdamW(optimizer_groups(param_groups(model, o.weight_decay)), lr=o.lr,
                                      betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        schedule = DeviceSchedule(optimizer, [lr_at(step, o, train.max_steps) for step in range(train.max_steps + 1)],
                                  layout.device)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=config, mpu=MegatronMPU())
    decide_on_device(engine, schedule)
    _measure_fp32_norm(engine)
    _undo_unfused_init_step(engine)
    _scale_fp16_zero0_loss(engine)
    _fp16_zero0_norm(engine)
    if layout.dp == 1 and zero_stage == 0:
        # One data-parallel rank: nothing to average. DeepSpeed would still flatten every gradient,
        # all-reduce it over a group of one and copy it back (~2 ms/step for the tiny model on CPU).
        engine.enable_backward_allreduce = False
    return engine


def _fp16_zero0_norm(engine) -> None:
    """7 above: FP16_UnfusedOptimizer.step takes `get_weight_norm` of the gradients that
    `split_params_grads_into_shared_and_expert_params` returns (fp16/unfused_optimizer.py, `step`); that function,
    in its module, is replaced by one that leaves out the copies other stages write (state.is_stage_copy: the
    copy's gradient still updates it) and marks each gradient of a tensor-parallel split parameter as such, the
    mark `get_weight_norm` counts a tensor by on tensor-parallel ranks > 0. The overflow check is DeepSpeed's,
    per parameter, agreed over the model-parallel group."""
    if not (engine.fp16_enabled() and unfused_masters(engine)):
        return
    import deepspeed.runtime.fp16.unfused_optimizer as unfused
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import is_model_parallel_parameter

    if getattr(unfused.split_params_grads_into_shared_and_expert_params, "marks_gradients", False):
        return

    def with_marks(group):
        shared, experts = [], []
        for p in group:
            if p.grad is None or state.is_stage_copy(p):
                continue
            grad = p.grad.to(p.dtype)
            if is_model_parallel_parameter(p):
                grad.tensor_model_parallel = True
            (experts if is_moe_param(p) else shared).append(grad)
        return shared, experts

    with_marks.marks_gradients = True
    unfused.split_params_grads_into_shared_and_expert_params = with_marks


def _measure_fp32_norm(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 path hands the gradients straight to the torch optimizer, and clips with
    `clip_grad_norm_` but drops the norm it returns (so `get_global_grad_norm()` stays None). Here the
    norm is kept (same clipping, on the device, no host read), also when nothing is clipped, so that
    on_device skips a step whose norm is inf/NaN as DeepSpeed's other optimizers do. The `overflow`
    flag the engine reads after every step (engine.py `_take_model_step`) stays False: the device
    decides."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    optimizer = engine.optimizer
    torch_step = optimizer.step  # on_device's: sets found_inf from engine._global_grad_norm
    optimizer.overflow = False

    def record_norm(max_norm: float) -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params)
        if max_norm != float("inf"):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in params], coef)
        engine._global_grad_norm = norm

    def step(closure=None):
        if engine.gradient_clipping() <= 0:  # not clipped, so no norm yet: measure without clipping
            record_norm(float("inf"))
        return torch_step(closure)

    engine.clip_fp32_gradients = lambda: record_norm(engine.gradient_clipping())
    optimizer.step = step


def _scale_fp16_zero0_loss(engine) -> None:
    """fp16 at ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer around our torch AdamW): DeepSpeed 0.19.8's
    `engine.backward` scales the loss only when the optimizer is a ZeRO optimizer (runtime/engine.py,
    "TODO: handle these scaling"), but FP16_UnfusedOptimizer.step divides the gradients by the loss scale
    all the same (`unscale_and_clip_grads`) and never sees an overflow: updates ~65,536x too small and no
    protection from fp16 underflow (measured on CPU: the gradients after backward had the unscaled norm).
    Here backward multiplies the loss by the scale, as `FP16_UnfusedOptimizer.backward` would; the
    optimizer's norm is then of the scaled gradients (state.unscaled_grad_norm divides it back)."""
    if not (engine.fp16_enabled() and unfused_masters(engine)):
        return
    scaler = engine.optimizer.loss_scale_config
    deepspeed_backward = engine.backward

    def backward(loss, *args, **kwargs):
        return deepspeed_backward(loss * scaler.cur_scale, *args, **kwargs)

    engine.backward = backward


def _undo_unfused_init_step(engine) -> None:
    """DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at ZeRO-0) creates AdamW's state by running one
    step with zero gradients at start (fp16/unfused_optimizer.py `initialize_optimizer_states`). The
    update is zero, but AdamW's step count is then 1 ahead, so bias correction shrinks the first real
    updates (~0.74x at the first step), and its fp32 masters received one weight decay the model's
    weights did not. Here that step is undone — count 0, masters equal to the weights — so ZeRO-0
    follows the same trajectory as ZeRO-1/2/3, which start from a fresh AdamW."""
    masters = unfused_masters(engine)
    if not masters:
        return
    basic = engine.optimizer.optimizer
    with torch.no_grad():
        for p in engine.module.parameters():
            if id(p) in masters:
                masters[id(p)].copy_(p.float())
                state = basic.state[masters[id(p)]]
                state["step"].zero_()
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key].zero_()
