"""The step's decisions on the device: whether an update is applied, and the learning rate.

DeepSpeed decides on the host whether a step is skipped (an inf/NaN gradient norm): it reads the norm
with `.item()` / `bool(tensor)`, which on a GPU stalls the host until the device has finished the
backward pass, every step. Here the decision stays on the device, for the optimizer paths that allow it
(written against DeepSpeed 0.19.8, see versions.py):

- `found_inf`: torch's fused AdamW takes a 0-d `found_inf` tensor (the hook GradScaler uses): when it is
  1 the kernel leaves weights, moments and the step count as they were. It is set from the global
  gradient norm just before every optimizer step (`inf`, `NaN` or DeepSpeed's -1 "invalid" sentinel).
- The LR schedule is a table (`optim.lr_at` of every step, computed once on the host) indexed by a
  device counter of *applied* steps, so a skipped step does not advance the schedule, without the host
  knowing that it was skipped. The learning rate in the param groups is that 0-d tensor.
- DeepSpeed's own host checks are turned off where the device decides: its ZeRO-1/2, ZeRO-3 and BF16
  (bf16 at ZeRO-1) optimizers read `is_invalid_grad_norm(norm)` (a `bool(tensor)`); while an optimizer
  adapted here steps, that answers False for a tensor, and the fused kernel skips instead (other
  DeepSpeed engines in the same process see DeepSpeed's own function). ZeRO-1/2's separate gradient
  overflow scan (`check_grad_overflow`, one `.item()` per step) is off: the norm sees the same inf/NaN. The BF16
  optimizer's clipping (`clip_tensors_by_global_norm`: `if clip_coef < 1` reads the device) becomes a
  multiply by min(coef, 1) (x * 1.0 is x exactly, so the numbers are the same).
- bf16 at ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer scans every gradient with `.item()`, reads each
  group's norm and compares the clip factor on the host, one tensor at a time. Its `step` is replaced
  (`_unfused_bf16_step`): the same fp32 masters and AdamW, with multi-tensor operations and the decision
  on the device. fp16 (dynamic loss scaling, GPU only) keeps DeepSpeed's host decisions; when such a path
  skips it does not call the schedule's `step()`, so the counter does not advance either.

A step was skipped iff the counter did not advance (`TrainEngine.step` compares it on the device).
"""

from __future__ import annotations

import contextvars

import torch

# DeepSpeed modules whose host check of the gradient norm the device decision replaces
_HOST_CHECKS = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                "deepspeed.runtime.bf16_optimizer")
_DECIDING = contextvars.ContextVar("gorilla_dist_on_device", default=False)
"""True while an optimizer adapted here steps: the replaced module functions act only then, so any other
DeepSpeed engine in the process behaves exactly as DeepSpeed wrote it."""


def invalid(norm: torch.Tensor) -> torch.Tensor:
    """0-d float: 1.0 when the norm is inf, NaN or negative (DeepSpeed's sentinel for a non-finite group
    norm), else 0.0 (DeepSpeed's `is_invalid_grad_norm`, without reading it)."""
    norm = norm.float()
    return (~torch.isfinite(norm) | (norm < 0)).float().reshape(())


class DeviceSchedule:
    """The learning-rate schedule as DeepSpeed's `lr_scheduler`: `step()` (DeepSpeed calls it after each
    step it believes applied) advances a device counter by 1 - found_inf and sets the groups' 0-d LR to
    table[counter]. `applied`: optimizer steps applied so far (0-d, on the device)."""

    def __init__(self, optimizer: torch.optim.Optimizer, table: list[float], device: torch.device):
        self.optimizer = optimizer
        self.table = torch.tensor(table, dtype=torch.float32, device=device)  # (max_steps + 1,)
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = torch.empty((), dtype=torch.float32, device=device)
        self._refresh()
        for group in optimizer.param_groups:
            group["lr"] = self.lr  # one tensor: the fused kernel reads it, step() rewrites it in place

    def _refresh(self) -> None:
        index = self.applied.clamp(max=len(self.table) - 1).reshape(1)
        self.lr.copy_(self.table.index_select(0, index).reshape(()))

    def before_update(self, norm) -> None:
        """The global gradient norm of this step (a tensor; None: not measured): skip on the device."""
        if torch.is_tensor(norm):
            self.found_inf.copy_(invalid(norm))
        else:
            self.found_inf.zero_()
        self.optimizer.found_inf = self.found_inf

    def step(self, *_, **__) -> None:
        self.applied.add_(1 - self.found_inf.long())
        self.found_inf.zero_()
        self._refresh()

    def get_lr(self) -> list[torch.Tensor]:
        return [self.lr for _ in self.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict:
        """Where the schedule is, under LambdaLR's names (last_epoch: the applied steps; _last_lr: the next
        step's LR, for a reader): checkpoints written with LambdaLR load the same way. Reads the device."""
        applied = int(self.applied)
        return {"last_epoch": applied, "_step_count": applied + 1,
                "_last_lr": [float(self.lr)] * len(self.optimizer.param_groups)}

    def load_state_dict(self, state: dict) -> None:
        self.applied.fill_(int(state["last_epoch"]))
        self._refresh()


def decide_on_device(engine, schedule: DeviceSchedule) -> None:
    """Route the skip decision of `engine`'s optimizer path through `schedule` (see the module docstring)."""
    import sys

    from gorilla_dist.engine.state import _is_zero, unfused_masters

    optimizer = engine.optimizer
    basic = getattr(optimizer, "optimizer", optimizer)
    if engine.fp16_enabled():
        return  # DeepSpeed's loss scaler decides on the host (module docstring)
    # DeepSpeed's ZeRO-1/2 or ZeRO-3 optimizer, or its BF16_Optimizer (bf16 at ZeRO-1)
    wrapped = _is_zero(optimizer) or hasattr(optimizer, "fp32_groups_flat_partition")
    if wrapped:
        for name in _HOST_CHECKS:
            module = sys.modules.get(name)
            if module is not None and not getattr(module.is_invalid_grad_norm, "on_device", False):
                module.is_invalid_grad_norm = _on_device_check(module.is_invalid_grad_norm)
        bf16_module = sys.modules.get("deepspeed.runtime.bf16_optimizer")
        if bf16_module is not None and not getattr(bf16_module.clip_tensors_by_global_norm, "on_device", False):
            bf16_module.clip_tensors_by_global_norm = _clip_on_device(bf16_module.clip_tensors_by_global_norm)
        if hasattr(optimizer, "check_grad_overflow"):
            optimizer.check_grad_overflow = False
        deepspeed_step = optimizer.step

        def deciding_step(*args, **kwargs):
            token = _DECIDING.set(True)
            try:
                return deepspeed_step(*args, **kwargs)
            finally:
                _DECIDING.reset(token)

        optimizer.step = deciding_step
    elif unfused_masters(engine):
        optimizer.step = lambda closure=None: _unfused_bf16_step(engine, optimizer)
    torch_step = basic.step

    def step(closure=None):
        norm = getattr(optimizer, "_global_grad_norm", None) if wrapped or optimizer is not basic \
            else engine._global_grad_norm
        schedule.before_update(norm)
        return torch_step(closure)

    basic.step = step


def _on_device_check(host_check):
    def check(norm):
        if torch.is_tensor(norm) and _DECIDING.get():
            return False  # decided on the device (found_inf), see gorilla_dist/engine/on_device.py
        return host_check(norm)

    check.on_device = True
    return check


def _clip_on_device(host_clip):
    """DeepSpeed's `clip_tensors_by_global_norm` with the norm given (as the BF16 optimizer calls it),
    without reading it: multiply by min(max_norm / (norm + eps), 1)."""

    def clip(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6):
        if global_norm is None or not _DECIDING.get():
            return host_clip(input_tensors, max_norm=max_norm, global_norm=global_norm, mpu=mpu, eps=eps)
        coef = torch.clamp(max_norm / (global_norm + eps), max=1.0)
        torch._foreach_mul_([t.detach() for t in input_tensors], coef)
        return global_norm

    clip.on_device = True
    return clip


def _unfused_bf16_step(engine, optimizer) -> bool:
    """FP16_UnfusedOptimizer.step for bf16 (no loss scale), on the device: the global gradient norm
    (global_grad_norm: TP shards once, experts over their group), the fp32 master
    gradients, clipping by min(clip / (norm + 1e-6), 1), AdamW (which skips a non-finite norm through
    found_inf), and the bf16 weights copied from the masters."""
    lows = [p for group in optimizer.fp16_groups for p in group]
    highs = [p for group in optimizer.fp32_groups for p in group]
    norm = global_grad_norm([p for p in lows if p.grad is not None])
    for low, high in zip(lows, highs):
        high.grad = torch.zeros_like(high) if low.grad is None else low.grad.to(high.dtype)
    if optimizer.clip_grad > 0:
        coef = torch.clamp(optimizer.clip_grad / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([h.grad for h in highs], coef)
    optimizer._global_grad_norm = norm
    optimizer.overflow = False
    optimizer.optimizer.step()
    for high in highs:
        high.grad = None
    with torch.no_grad():  # the bf16 weights (leaves that require grad)
        torch._foreach_copy_(lows, highs)
    return False


def global_grad_norm(params) -> torch.Tensor:
    """The L2 norm of the whole model's gradient: each tensor-parallel shard counted once (a tensor that
    is not split, once per TP group), every pipeline stage's parameters, and expert-parallel experts summed over their expert-parallel group,
    whose ranks hold different experts. (DeepSpeed's clip_grad_norm_ averages the ranks' norms over the
    data-parallel group instead, which is not the norm once ranks hold different experts.)"""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gorilla_dist.engine.moe import is_expert_parallel
    from gorilla_dist.engine.state import is_stage_copy

    tp_rank = ps.get_tensor_model_parallel_rank()
    device = params[0].grad.device if params else torch.device("cpu")  # sums stay where the gradients are
    # the last pipeline stage's copy of tied embeddings (megatron_cpu.py 10) is counted on the first stage
    counted = [p for p in params if (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
               and not is_stage_copy(p)]

    def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:  # one multi-tensor kernel, not one per tensor
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm([g.detach().float() for g in grads])).pow(2).sum()

    dense = sum_of_squares([p.grad for p in counted if not is_expert_parallel(p)])
    expert = sum_of_squares([p.grad for p in counted if is_expert_parallel(p)])
    if dist.is_initialized():
        if ps.get_expert_model_parallel_world_size() > 1:
            dist.all_reduce(expert, group=ps.get_expert_model_parallel_group())
        total = dense + expert
        dist.all_reduce(total, group=ps.get_model_parallel_group())  # tensor- and pipeline-parallel ranks
    else:
        total = dense + expert
    return total.sqrt()
