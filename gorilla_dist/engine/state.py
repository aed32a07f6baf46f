"""Layout-free training state: what a checkpoint holds, independent of how the run was laid out.

Every parameter's fp32 master weight and its AdamW moments are stored under the name a single-process
model gives the parameter, at its full shape, whatever the tensor-parallel size, expert-parallel size,
ZeRO stage or precision of the run that wrote them (experts split over expert-parallel ranks are stored
one by one under their global index: local expert j of EP rank r is expert r * experts / ep + j).
Loading is the inverse: each rank takes its tensor-parallel slice and hands it to whichever optimizer
the engine has (torch's AdamW for fp32 ZeRO-0, DeepSpeed's bf16 or ZeRO 1/2/3 optimizers), which keeps
its own partition. So a checkpoint written by
DP=2 x TP=2 ZeRO-3 bf16 resumes under one fp32 process, or DP=4 ZeRO-1, and continues the same
trajectory.

DeepSpeed's per-parameter accessors (`deepspeed.utils.safe_get_full_fp32_param` and friends) reach
its partitioned fp32 copies; they are collectives over the data-parallel group, so every rank calls
these functions for every parameter in the same order. Written against DeepSpeed 0.19.8 (versions.py):
besides those accessors it reads the optimizers' flat groups and partitions by their field names and
relinks their state (`_link_optimizer_state`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gorilla_dist.engine.moe import is_expert_parallel

MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state besides the step count."""


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


_LOCAL_EXPERT = re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$")


def _ep() -> tuple[int, int]:
    """(expert-parallel size, this rank's index in it)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()


_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
TIED_EMBEDDING = "embedding.word_embeddings.weight"


def is_stage_copy(p) -> bool:
    """A parameter another pipeline stage holds and writes (the last stage's tied output weight)."""
    return bool(getattr(p, "ds_pipe_replicated", False))


def global_name(module, name: str, p=None) -> str:
    """This rank's parameter (or buffer) `name` under the single-process model's name, experts aside: a
    pipeline stage's decoder layer i under its global index (megatron's layer_number - 1), and the last
    stage's copy of tied embeddings (marked ds_pipe_replicated: megatron_cpu.py 10) as the embeddings."""
    if p is not None and is_stage_copy(p):
        return TIED_EMBEDDING
    match = _LAYER.match(name)
    if match is None:
        return name
    layer = module.decoder.layers[int(match[2])]
    return f"{match[1]}{layer.layer_number - 1}{match[3]}"


def expert_names(module, name: str, p) -> list[str]:
    """The single-process names of parameter `name` on every expert-parallel rank, in EP-rank order
    ([its global_name] for everything but experts split over ranks): local expert j of EP rank r is expert
    r * num_experts / ep + j of the whole layer."""
    name = global_name(module, name, p)
    if not is_expert_parallel(p):
        return [name]
    ep, _ = _ep()
    match = _LOCAL_EXPERT.match(name)
    local = module.config.num_moe_experts // ep
    return [f"{match[1]}{r * local + int(match[2])}{match[3]}" for r in range(ep)]


def single_process_name(module, name: str, p) -> str:
    """This rank's parameter `name` under the single-process model's name (global layer and expert index)."""
    return expert_names(module, name, p)[_ep()[1] if is_expert_parallel(p) else 0]


def ep_all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The same parameter's tensor from every expert-parallel rank, in EP-rank order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(tensor) for _ in range(_ep()[0])]
    dist.all_gather(parts, tensor.contiguous(), group=ps.get_expert_model_parallel_group())
    return parts


def _full(module, name: str, p, local: torch.Tensor) -> dict[str, torch.Tensor]:
    """{single-process name: full tensor} from this rank's piece `local` of p: tensor-parallel shards
    joined; experts split over expert-parallel ranks gathered, one entry per expert. Collective."""
    full = tp_full(module, name, p, local)
    if not is_expert_parallel(p):
        return {name: full}
    return dict(zip(expert_names(module, name, p), ep_all_gather(full)))


TRAINED_BUFFERS = ("expert_bias",)
"""Buffers that training changes outside the gradient (DeepSeek-V3's router expert bias): saved with the
weights under their single-process names, the same on every rank (they follow all-reduced counts)."""


def trained_buffers(module) -> dict[str, torch.Tensor]:
    """{single-process name: buffer} of this rank's TRAINED_BUFFERS."""
    return {global_name(module, name): b for name, b in module.named_buffers()
            if name.rsplit(".", 1)[-1] in TRAINED_BUFFERS}


def _is_gated_fc1(module, name: str) -> bool:
    return getattr(getattr(module, "config", None), "gated_linear_unit", False) and "linear_fc1" in name


def tp_join(shards: list[torch.Tensor], dim: int, gated: bool) -> torch.Tensor:
    """The single-process tensor from its tensor-parallel shards (in TP-rank order), concatenated along
    `dim` (megatron-core's fused QKV is grouped by query group, so the concatenation is the TP=1
    layout); a gated MLP keeps [gate; up] per rank, so its shards are re-interleaved into the TP=1
    [gate; up] order. No communication."""
    if gated:
        halves = [s.chunk(2, dim=dim) for s in shards]
        shards = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(shards, dim=dim)


def tp_split(full: torch.Tensor, rank: int, size: int, dim: int, gated: bool) -> torch.Tensor:
    """TP rank `rank`'s shard of the single-process tensor `full` (the inverse of tp_join)."""
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def _tp_split_of(module, name: str, p) -> tuple[int, int, int, bool] | None:
    """(TP rank, TP size, partition dim, gated) of a tensor-parallel parameter; None when p is whole
    on every TP rank."""
    tp = _tp_size()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return None
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), tp, p.partition_dim, _is_gated_fc1(module, name)


def tp_full(module, name: str, p, local: torch.Tensor) -> torch.Tensor:
    """The single-process tensor from this rank's tensor-parallel shard `local` of parameter `p`
    (tp_join). Collective over the TP group."""
    split = _tp_split_of(module, name, p)
    if split is None:
        return local
    from gorilla_dist.parallel import tp_all_gather

    return tp_join(tp_all_gather(local), split[2], split[3])


def tp_local(module, name: str, p, full: torch.Tensor) -> torch.Tensor:
    """This rank's tensor-parallel shard of the single-process tensor `full` (the inverse of tp_full)."""
    split = _tp_split_of(module, name, p)
    return full if split is None else tp_split(full, *split)


def _deepspeed_owns(p) -> bool:
    """True when a DeepSpeed optimizer (bf16/fp16, ZeRO 1-3) keeps p's fp32 master and moments."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _basic_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW doing the update (inside DeepSpeed's wrapper, when there is one)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's own shape (this TP rank's), also when ZeRO-3 has partitioned it (its .shape is then that
    of an empty placeholder)."""
    return tuple(p.ds_shape if hasattr(p, "ds_id") else p.shape)


def unfused_masters(engine) -> dict[int, torch.Tensor]:
    """{id(model parameter): its fp32 master} for DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at
    ZeRO-0), which keeps one unpartitioned fp32 copy per parameter; empty for every other optimizer."""
    opt = engine.optimizer
    if not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")) or _is_zero(opt):
        return {}
    return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}


def _is_zero(opt) -> bool:
    return hasattr(opt, "fp32_partitioned_groups_flat") or hasattr(opt, "single_partition_of_fp32_groups")


def _rank_master(engine, p, key: str | None, unfused: dict) -> torch.Tensor:
    """p's fp32 master (key None) or AdamW moment, at p's local (this TP rank's) shape."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if id(p) in unfused:
        p = unfused[id(p)]  # its master: plain AdamW state from here on
    elif _deepspeed_owns(p):
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return value.detach().float().reshape(logical_shape(p))
    if key is None:
        return p.detach().float()
    state = _basic_optimizer(engine).state.get(p, {})
    return state[key].detach().float() if key in state else torch.zeros_like(p, dtype=torch.float32)


def optimizer_step_count(engine) -> int:
    """AdamW's step count (the same for every parameter); 0 before the first step."""
    steps = {int(s["step"]) for s in _basic_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"parameters disagree on the optimizer step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def full_state(engine, *, keep: bool = True, trainable_only: bool = False) -> tuple[dict, dict, list[str]]:
    """(weights, moments, non-finite): fp32 tensors under single-process names and shapes, on the CPU;
    moments are keyed `<param>.exp_avg` / `<param>.exp_avg_sq`; the names of weights holding inf/NaN.
    Collective: every rank calls it. Each whole tensor passes through every rank one at a time; ranks
    with keep=False (all but the writer) drop them, so they never hold more than one. trainable_only:
    leave out frozen parameters (requires_grad False: fine-tuning), which have no master or moments."""
    module, unfused = engine.module, unfused_masters(engine)
    _link_optimizer_state(engine)
    weights, moments, bad = {}, {}, []
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        for full_name, weight in _full(module, name, p, _rank_master(engine, p, None, unfused)).items():
            if not torch.isfinite(weight).all():
                bad.append(full_name)
            if keep:
                weights[full_name] = weight.cpu().contiguous()
        for key in MOMENTS:
            for full_name, moment in _full(module, name, p, _rank_master(engine, p, key, unfused)).items():
                if keep:
                    moments[f"{full_name}.{key}"] = moment.cpu().contiguous()
    if keep:
        weights.update({name: b.detach().float().cpu().clone() for name, b in trained_buffers(module).items()})
    return weights, moments, bad


@dataclass
class Piece:
    """One rank's part of one layout-free tensor, as a checkpoint shard stores it: `data` (1-D fp32) is
    elements [start, start + data.numel()) of the flattened tensor-parallel shard of shape `local` of
    the single-process tensor of shape `shape`; tp = (TP rank, TP size, partition dim, gated) says how
    the shards join (tp_join), None when `local` is the whole tensor."""

    shape: tuple[int, ...]
    tp: tuple[int, int, int, bool] | None
    local: tuple[int, ...]
    start: int
    data: torch.Tensor


def _writes_replica(p) -> bool:
    """Whether this rank writes a tensor that every rank of p's data-parallel group holds whole (fp32
    ZeRO-0, the unfused bf16/fp16 masters, frozen parameters): its data-parallel rank 0 does (for
    experts, the expert-data-parallel group's)."""
    from megatron.core import parallel_state as ps

    return (ps.get_expert_data_parallel_rank() if is_expert_parallel(p) else ps.get_data_parallel_rank()) == 0


def _owned(engine, p, key: str | None, unfused: dict) -> tuple[int, torch.Tensor] | None:
    """(start, 1-D fp32 data): the part of p's fp32 master (key None) or AdamW moment `key` that this
    rank keeps and writes, as a range of p's flattened local (TP-shard) tensor; None when another rank
    of p's data-parallel group writes it. No communication; the data are views where they can be."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition of the flattened parameter, padded at the end
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        if p.requires_grad:
            local = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        else:  # frozen: no master; the model's own partition, and no moments
            local = p.ds_tensor if key is None else torch.zeros(p.ds_tensor.numel())
        local = local.detach().reshape(-1)
        start = dist.get_rank(group=p.ds_process_group) * local.numel()
        end = min(start + local.numel(), p.ds_numel)
        return (start, local[:end - start].float()) if end > start else None
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer: a fragment, or nothing
        mapping = p._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment(key).detach().reshape(-1).float()
    if not _writes_replica(p):
        return None
    if id(p) in unfused:
        p = unfused[id(p)]  # its master: plain AdamW state from here on
    if key is None:
        return 0, p.detach().reshape(-1).float()
    state = _basic_optimizer(engine).state.get(p, {}) if p.requires_grad else {}
    return 0, (state[key].detach().reshape(-1).float() if key in state else torch.zeros(p.numel()))


def local_state(engine, *, trainable_only: bool = False) -> tuple[dict[str, Piece], dict[str, Piece], list[str]]:
    """(weights, moments, non-finite): this rank's share of full_state, without communication and
    without copying: for every parameter the Pieces of its fp32 master and AdamW moments that this rank
    keeps (its ZeRO partition, its TP shard) and no other rank writes, so that the pieces of all ranks
    together cover every single-process tensor exactly once; moments keyed `<param>.exp_avg` /
    `.exp_avg_sq`; trained buffers from the first rank of each pipeline stage. The names of weights whose pieces here hold
    inf/NaN. trainable_only as in full_state."""
    import torch.distributed as dist

    module, unfused = engine.module, unfused_masters(engine)
    _link_optimizer_state(engine)
    weights, moments, bad = {}, {}, []
    for name, p in module.named_parameters():
        if (trainable_only and not p.requires_grad) or is_stage_copy(p):
            continue
        split = _tp_split_of(module, name, p)
        if split is None and _tp_size() > 1:
            from megatron.core import parallel_state as ps

            if ps.get_tensor_model_parallel_rank() != 0:  # the same on every TP rank: TP rank 0 writes it
                continue
        full_name, shape = single_process_name(module, name, p), full_shape(module, name, p)
        local = logical_shape(p)
        for key in (None, *MOMENTS):
            owned = _owned(engine, p, key, unfused)
            if owned is None:
                continue
            piece = Piece(shape, split, local, *owned)
            if key is None:
                weights[full_name] = piece
                if not torch.isfinite(piece.data).all():
                    bad.append(full_name)
            else:
                moments[f"{full_name}.{key}"] = piece
    if _first_of_stage():
        for name, b in trained_buffers(module).items():
            weights[name] = Piece(tuple(b.shape), None, tuple(b.shape), 0, b.detach().reshape(-1).float().clone())
    return weights, moments, bad


def _first_of_stage() -> bool:
    """Whether this is its pipeline stage's first rank (data- and tensor-parallel rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return True
    return ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0


def schedule_state(engine) -> dict:
    """Everything besides tensors that the next step depends on, as JSON: AdamW's step count, the LR
    schedule, DeepSpeed's step counters and (fp16) its loss scaler."""
    return {"optimizer_step": optimizer_step_count(engine),
            "lr_schedule": engine.lr_scheduler.state_dict(),  # as LambdaLR's numbers (on_device.DeviceSchedule)
            "engine": {k: skipped_steps(engine) if k == "skipped_steps" else int(getattr(engine, k))
                       for k in ENGINE_COUNTERS},
            "loss_scaler": scaler_state(engine)}


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def skipped_steps(engine) -> int:
    """Steps whose update was not applied: DeepSpeed counts every step, the schedule the applied ones
    (DeepSpeed's own `skipped_steps` misses the steps skipped on the device, see on_device.py)."""
    return int(engine.global_steps) - int(engine.lr_scheduler.applied)
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler(engine):
    """fp16's dynamic loss scaler (ZeRO: `loss_scaler`; ZeRO-0: `loss_scale_config`), else None."""
    if not engine.fp16_enabled():
        return None
    return getattr(engine.optimizer, "loss_scaler", None) or getattr(engine.optimizer, "loss_scale_config", None)


def loss_scale(engine) -> float | None:
    """fp16: the loss scale the next backward multiplies by; None for fp32/bf16."""
    scaler = _loss_scaler(engine)
    return None if scaler is None else float(scaler.cur_scale)


def scaler_state(engine) -> dict | None:
    """fp16's loss-scaler state (the scale, its iteration and last overflow), for checkpoints."""
    scaler = _loss_scaler(engine)
    return {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)} if scaler else None


def load_scaler_state(engine, saved: dict | None) -> None:
    scaler = _loss_scaler(engine)
    for key, value in (saved or {}).items():
        if scaler is None or not hasattr(scaler, key):
            continue  # a checkpoint of another precision (or of ZeRO vs ZeRO-0, whose scalers differ)
        setattr(scaler, key, value)


def unscaled_grad_norm(engine, scale: float | None):
    """The step's global gradient norm of the true (unscaled) gradients. DeepSpeed's FP16_UnfusedOptimizer
    (fp16 at ZeRO-0 with a torch optimizer) keeps the norm of the loss-scaled gradients
    (fp16/unfused_optimizer.py `step`: `get_global_norm` of the fp16 gradients, divided by the scale only
    inside its clipping), ~65,536x the real one at the default scale; its ZeRO optimizers and
    FP16_Optimizer divide by the scale themselves. `scale`: the one the step's backward used (the scaler may
    have changed it at the update)."""
    norm = engine.get_global_grad_norm()
    if scale is not None and norm is not None and unfused_masters(engine):
        return norm / scale
    return norm


def _set_model_weight(p, value: torch.Tensor) -> None:
    """The model's (possibly bf16, possibly ZeRO-3 partitioned) copy of p := value."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0's value is re-partitioned
            p.data.copy_(value.to(p.device, p.dtype).reshape(p.ds_shape))
    else:
        p.data.copy_(value.to(p.device, p.dtype))


def _link_optimizer_state(engine) -> None:
    """Make every parameter's AdamW state reachable through DeepSpeed's accessors.

    AdamW creates its state (zeros) at its first step; here it is created the same way where that step
    has not run yet, so a checkpoint can be loaded into it. DeepSpeed's ZeRO-1/2 and bf16 optimizers
    link each parameter to its slice of that state only after their first step
    (`_lazy_init_hp_params_optimizer_state`), and ZeRO-1/2 does it right after stepping its *first*
    param group, when the second group (our no-weight-decay parameters) has no state yet: those
    parameters stay unlinked for good and `safe_get_full_optimizer_state` raises for them
    (DeepSpeed 0.19.8, stage_1_and_2.py `_optimizer_step`). The link is redone here over all groups with
    DeepSpeed's own `lazy_init_hp_params_optimizer_state`. ZeRO-3 creates and links its state at start."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    basic, opt = _basic_optimizer(engine), engine.optimizer
    # ZeRO-3 puts its flat fp32 partitions into AdamW's param groups only while it steps them
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in basic.param_groups for p in g["params"]]
    for p in masters:
        state = basic.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)  # fused AdamW: on p's device
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    hp_groups = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition",
                                                                                   None)
    if lp_groups is not None and hp_groups is not None:
        for lp, hp in zip(lp_groups, hp_groups):
            lazy_init_hp_params_optimizer_state(lp, hp, basic.state)
        opt._hp_optimizer_states_linked = True


def load_full_state(engine, weights, moments, schedule: dict, *, fresh=frozenset()) -> None:
    """Inverse of full_state + schedule_state, for any layout: every rank takes its slice. `weights`
    and `moments` are mappings or safetensors handles (read one tensor at a time). Collective. The
    caller has checked that the names and shapes fit (check_fits)."""
    get_w = getattr(weights, "get_tensor", None) or weights.__getitem__
    get_m = getattr(moments, "get_tensor", None) or moments.__getitem__
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module, basic, unfused = engine.module, _basic_optimizer(engine), unfused_masters(engine)
    _link_optimizer_state(engine)
    for name, p in module.named_parameters():
        full_name = single_process_name(module, name, p)
        if full_name in fresh:  # not in the source (adapters new to this run): keep the built values
            continue
        local = tp_local(module, name, p, get_w(full_name))
        _set_model_weight(p, local)
        if not p.requires_grad:  # frozen (fine-tuning): no master, no optimizer state
            continue
        local_moments = {key: tp_local(module, name, p, get_m(f"{full_name}.{key}")) for key in MOMENTS}
        if id(p) in unfused:
            master = unfused[id(p)]
            master.data.copy_(local)
            for key, value in local_moments.items():
                basic.state[master][key] = value.to(master.device).clone()
        elif _deepspeed_owns(p):
            safe_set_full_fp32_param(p, local.to(p.device))
            for key, value in local_moments.items():
                safe_set_full_optimizer_state(p, value.to(p.device), key)
        else:  # torch's AdamW on the model's own fp32 parameters: its state, as its step() would make it
            state = basic.state[p]
            for key, value in local_moments.items():
                state[key] = value.to(p.device, p.dtype).clone()
    load_trained_buffers(module, get_w)
    for master, state in basic.state.items():
        state["step"] = torch.tensor(float(schedule["optimizer_step"]), dtype=torch.float32, device=master.device)
    engine.lr_scheduler.load_state_dict(schedule["lr_schedule"])  # the applied steps, so the next step's LR
    for key, value in schedule["engine"].items():
        setattr(engine, key, value)
    load_scaler_state(engine, schedule.get("loss_scaler"))


def load_trained_buffers(module, get) -> None:
    """TRAINED_BUFFERS from `get(name)` (a checkpoint's weights)."""
    with torch.no_grad():
        for name, b in trained_buffers(module).items():
            b.copy_(get(name).to(b.device, b.dtype))


def check_fits(module, shapes: dict[str, tuple], source: str, *, fresh=frozenset()) -> None:
    """A CheckpointError naming what does not match, unless `shapes` has exactly the single-process
    names and shapes of `module`'s parameters (but those named in `fresh`, which it may lack)."""
    from gorilla_dist.errors import CheckpointError

    params = model_shapes(module)
    missing, unexpected = sorted(params.keys() - shapes.keys() - fresh), sorted(shapes.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit this model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); was it written with another model config?")
    for full, want in params.items():
        if full in shapes and tuple(shapes[full]) != want:
            raise CheckpointError(f"{source}: {full} has shape {tuple(shapes[full])}, this model's is "
                                  f"{want}; was it written with another model config?")


def model_shapes(module) -> dict[str, tuple[int, ...]]:
    """{single-process name: full shape} of the whole model's parameters and trained buffers: this rank's, and
    with pipeline stages every stage's (gathered over the pipeline group: a collective)."""
    from gorilla_dist.parallel import over_stages

    shapes = {full: full_shape(module, name, p) for name, p in module.named_parameters()
              for full in expert_names(module, name, p)}
    shapes.update({name: tuple(b.shape) for name, b in trained_buffers(module).items()})
    return {k: v for stage in over_stages(shapes) for k, v in stage.items()}


def full_shape(module, name: str, p) -> tuple[int, ...]:
    """The single-process shape of parameter (or trained buffer) p (no communication)."""
    shape = list(logical_shape(p))
    if _tp_size() > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= _tp_size()
    return tuple(shape)
