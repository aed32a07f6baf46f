"""Mixture-of-experts pieces of the engine boundary (megatron-core 0.16.1, DeepSpeed 0.19.8).

1. The auxiliary losses. megatron's router adds the load-balancing and z-loss gradients in backward
   through `MoEAuxLossAutoScaler`, scaled by the factor megatron's own schedule sets to
   1 / micro-batches (x the fp16 loss scale). DeepSpeed divides the language-model loss by the
   accumulation count instead, so `set_aux_loss_scale` gives the aux losses that same factor before
   every backward: without it their gradient would be `accumulation` times too large.
2. What the routers did. `RouterStats` counts, per MoE layer, the tokens routed to each expert (after
   any capacity drop) and the assignments asked for (tokens x topk), with a forward hook on each router,
   and reads the aux / z loss values from megatron's layer-wise tracker (then clears it). All of it stays
   on the device until the metrics' one read per log interval. Only forwards that build a graph count:
   evaluation does not, and full activation recompute runs the layer's first forward without a graph.
3. Aux-loss-free balancing (DeepSeek-V3): `update_expert_bias` moves each router's `expert_bias` after a
   step by rate * sign(mean load - load), from the step's token counts summed over every rank: megatron's
   get_updated_expert_bias, called from its finalize_model_grads (which we do not use), with one
   all-reduce for all layers instead of one per layer.
4. Expert parallelism inside DeepSpeed: see `deepspeed_expert_groups`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

AUX_LOSSES = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}
"""megatron's tracker names -> our metric names."""


def moe_layers(model: torch.nn.Module) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def reset_aux_loss_tracker() -> None:
    """Empty megatron's layer-wise aux-loss tracker: it sizes its per-layer vectors by the first model that
    logs into it, so each newly built MoE model (another layer count, in the same process) starts afresh."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


def set_aux_loss_scale(scale: float, device: torch.device) -> None:
    """1 above: the factor on the aux losses' gradients (the language-model loss's backward factor)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.full((), float(scale), device=device))  # (a fill: no host copy)


class RouterStats:
    """2 above. `take(micro_batches)` after each optimizer step returns one flat float tensor (this rank's
    numbers for that step, on the device); `summarize(summed, dp)` turns the sum of those tensors over
    every rank (and over the steps of a log interval, for the load) into metrics."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.layers = moe_layers(model)
        config = model.config
        # one row per MoE layer of the whole model, by global layer index: a pipeline stage fills its own layers'
        # rows and leaves the others zero, so the sum over every rank adds each layer's numbers over the ranks
        # that hold it (the layer indices of the other stages: one gather at start)
        from gorilla_dist.parallel import over_stages

        mine = [layer.layer_number - 1 for layer in self.layers]
        self.rows = sorted({i for stage in over_stages(mine) for i in stage})
        self.n = len(self.rows)
        self.experts, self.topk = config.num_moe_experts, config.moe_router_topk
        self.counts = torch.zeros(self.n, self.experts + 1, device=device)  # per layer: experts..., asked
        self.logged = {metric for metric, coeff in (("moe_aux_loss", config.moe_aux_loss_coeff),
                                                    ("moe_z_loss", config.moe_z_loss_coeff)) if coeff}
        """The aux losses that are on (the others are not reported)."""
        for layer in self.layers:
            layer.router.register_forward_hook(self._hook(self.rows.index(layer.layer_number - 1)))

    def _hook(self, i: int):
        def count(router, args, output):
            if router.training and torch.is_grad_enabled():
                _probs, routing_map = output
                with torch.no_grad():
                    self.counts[i, :-1] += routing_map.sum(0)
                    self.counts[i, -1] += routing_map.shape[0] * self.topk
        return count

    def take(self, micro_batches: int) -> torch.Tensor:
        """[aux per layer, z per layer, counts per layer and expert, assignments asked per layer] of this
        step, flat; the aux / z values are means over the micro-batches."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        # (megatron's tracker has a value per global layer, zero for the layers of other stages)
        numbers = [self.counts.new_zeros(self.n) if name not in tracker else
                   tracker[name]["values"][self.rows].to(self.counts) / micro_batches for name in AUX_LOSSES]
        out = torch.cat([*numbers, self.counts.flatten()])
        clear_aux_losses_tracker()
        self.counts.zero_()
        return out

    def summarize(self, summed: torch.Tensor, dp: int) -> dict:
        """Metrics from `summed` (take()'s tensors summed over all ranks, one row per step; on the host).
        Aux / z (those that are on): per step, mean over MoE layers; the tensor-parallel ranks' partial values
        add up, the data-parallel ranks' are averaged. Load: over all the rows (the log interval), each
        expert's share of the routed tokens x num_experts (1.0 = uniform), per layer."""
        n, e = self.n, self.experts
        per_step = {}
        for j, (_, metric) in enumerate(AUX_LOSSES.items()):
            if metric in self.logged:
                per_step[metric] = (summed[:, j * n:(j + 1) * n].mean(1) / dp).tolist()
        counts = summed[:, 2 * n:].reshape(len(summed), n, e + 1).sum(0)  # (layers, experts + asked)
        routed = counts[:, :e]
        load = routed / routed.sum(1, keepdim=True).clamp(min=1) * e
        interval = {"moe_load_max": float(load.max()), "moe_load_min": float(load.min()),
                    "moe_load": [[round(x, 4) for x in row] for row in load.tolist()]}
        asked = counts[:, e].sum()
        interval["moe_dropped"] = float(1 - routed.sum() / asked) if asked > 0 else 0.0
        return {"per_step": per_step, "interval": interval}


def update_expert_bias(model: torch.nn.Module) -> None:
    """3 above, for every router with an expert bias; a no-op otherwise. Collective (all ranks): the token
    counts are laid out by global layer index, so pipeline stages (each with its own layers) sum correctly."""
    if not model.config.moe_router_enable_expert_bias:
        return
    routers = {layer.layer_number - 1: layer.router for layer in moe_layers(model)}
    counts = torch.zeros(model.config.num_layers, model.config.num_moe_experts, device=next(model.parameters()).device)
    for i, r in routers.items():
        counts[i] = r.local_tokens_per_expert
    if dist.is_initialized():
        dist.all_reduce(counts)  # every rank routes its own tokens (sequence-parallel slices included)
    with torch.no_grad():
        for i, r in routers.items():
            c = counts[i]
            r.expert_bias.add_(torch.sign(c.mean() - c) * r.config.moe_router_bias_update_rate)
            r.local_tokens_per_expert.zero_()


# ---------------------------------------------------------------------------------------------------
# 4. Expert parallelism inside DeepSpeed.
#
# megatron marks each expert parameter `allreduce=False` when ep > 1: it must be reduced over the
# expert-data-parallel group (the ranks holding the same experts), never averaged with another rank's
# different experts. DeepSpeed has that machinery for its own MoE layers (per-group reduction in
# ZeRO-0, MoE parameter groups partitioned over the expert-data-parallel group in ZeRO-1/2, per-parameter
# partition groups in ZeRO-3), found by looking for its own layer classes and keyed by a group name.
# `deepspeed_expert_groups` registers megatron's expert-parallel and expert-data-parallel groups under
# that name, names the group on each expert parameter, and builds the engine as `MegatronMoEEngine`,
# DeepSpeed's engine that also counts megatron-core MoE layers as MoE layers.


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def is_expert_parallel(p) -> bool:
    """megatron's mark on expert parameters split over ep > 1 ranks (`allreduce=False`)."""
    return getattr(p, "allreduce", True) is False


@contextmanager
def deepspeed_expert_groups(model: torch.nn.Module, ep: int):
    """Inside: deepspeed.initialize builds an engine that reduces and partitions megatron's expert
    parameters over megatron's expert-data-parallel group (a no-op unless ep > 1)."""
    if ep == 1 or not moe_layers(model):
        yield
        return
    import deepspeed
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    name = expert_group_name(ep)
    for registry, ranks, group in (
            (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, ps.get_expert_model_parallel_group()),
            (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
             ps.get_expert_data_parallel_group())):
        registry[name] = group
        ranks[name] = dist.get_process_group_ranks(group)
    for p in model.parameters():
        if is_expert_parallel(p):
            p.group_name = name  # DeepSpeed's key for the groups above
            p.ds_zero_placement_family = "autoep_expert"  # ZeRO-3: partitioned over that group
            p.ds_zero_partition_group_name = name
    engine_class = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = _megatron_moe_engine(engine_class)
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = engine_class


def _megatron_moe_engine(base):
    class MegatronMoEEngine(base):
        """DeepSpeed's engine, counting megatron-core MoE layers as MoE layers (it looks only for its own
        classes). ZeRO-3's MoE check asks for DeepSpeed's AutoEP layers; what it guards (per-parameter
        partition groups, no Ulysses sequence parallelism, no hpZ) holds for megatron's experts too."""

        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            layers = moe_layers(self.module)
            self.has_moe_layers = bool(layers)
            self.num_experts = [layer.config.num_moe_experts for layer in layers]

        def _validate_zero3_moe_compatibility(self):
            if self.zero_hpz_partition_size() > 1 or self.zero_quantized_gradients():
                raise AssertionError("expert parallelism with ZeRO-3 supports neither hpZ nor quantized gradients")

    return MegatronMoEEngine


def optimizer_groups(groups: list[dict]) -> list[dict]:
    """The optimizer's parameter groups, with expert-parallel parameters in DeepSpeed's MoE groups of
    their own (`moe=True`, named by their group; ZeRO-1/2 partitions those over the expert-data-parallel
    group). Unchanged when there are none."""
    if not any(is_expert_parallel(p) for g in groups for p in g["params"]):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": f"group{i}"} for i, g in enumerate(groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named, max_group_size=None) if g["params"]]
