"""Relaxed sharing (Bae et al. 2024, "Relaxed Recursive Transformers"): with model.sharing.lora_rank=r, every
layer gets its own low-rank delta on each linear of its attention and dense MLP, so layer i computes with
W_set(i) + B_i A_i. B starts at zero (the model at init is the shared model), A is random; AdamW's weight
decay on A and B (model.sharing.delta_weight_decay) pulls each layer back towards the shared weights.

The delta is added by a forward hook on megatron's tensor-parallel linear, in activation space (x A^T B^T,
never the full matrix), split the way the linear is:
  column-parallel (out split): A (r x in) whole on every TP rank, B (out/tp x r) split like W. The r-wide
      activation x A^T passes megatron's copy-to-TP region (its gradient summed over TP in backward), or,
      with sequence parallelism, its all-gather along the sequence (A then sees 1/tp of the tokens per rank:
      its gradient is a partial sum, marked `sequence_parallel` so the TP sum of engine/megatron_cpu.py adds it).
  row-parallel (in split): A (r x in/tp) split like W, B (out x r) whole. The partial x_local A_local^T is
      summed over TP (all-reduce, or reduce-scatter along the sequence with SP, B's gradient then partial).
Each delta parameter is an ordinary parameter of its linear (`<linear>.delta_A`, `.delta_B`), so DeepSpeed,
ZeRO-3's gathering, checkpoints (layout-free, TP-sliced like the weight) and consolidation see it as such.

LoRA (Hu et al. 2021, finetune.method=lora) is the same low-rank path under other names (`<linear>.lora_A`,
`.lora_B`) with PEFT's scale alpha / r and dropout on the input of A: `attach_low_rank` builds both.
"""

from __future__ import annotations

import torch

from gorilla_dist.engine.state import logical_shape

LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
"""The linears of a layer that get a delta (the dense MLP's; experts have none)."""


def delta_seed(seed: int, layer: int, linear: int) -> int:
    return (seed * 7_919 + layer * 104_729 + linear * 31 + 17) % (1 << 63)


def _low_rank_hook(prefix: str, scale: float, dropout: float):
    """A forward hook for a megatron linear: its (output, bias) with scale * drop(x) A^T B^T added to the
    output (A, B = `<prefix>_A`, `<prefix>_B` of the linear), laid out as the module docstring says."""
    def hook(lin, args, output):
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import mappings
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        out, bias = output
        x = args[0]
        a, b = getattr(lin, f"{prefix}_A"), getattr(lin, f"{prefix}_B")
        column = isinstance(lin, ColumnParallelLinear)
        sp = lin.sequence_parallel and lin.tp_group.size() > 1
        if dropout and lin.training:  # inputs that differ between TP ranks draw from megatron's per-rank RNG
            if column and not sp:
                x = torch.nn.functional.dropout(x, dropout)
            else:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    x = torch.nn.functional.dropout(x, dropout)
        z = x @ a.to(x.dtype).t()
        if column:
            z = (mappings.gather_from_sequence_parallel_region(z, group=lin.tp_group) if sp
                 else mappings.copy_to_tensor_model_parallel_region(z, group=lin.tp_group))
        else:
            z = (mappings.reduce_scatter_to_sequence_parallel_region(z, group=lin.tp_group) if sp
                 else mappings.reduce_from_tensor_model_parallel_region(z, group=lin.tp_group))
        delta = z @ b.to(z.dtype).t()
        return out + (delta if scale == 1.0 else scale * delta), bias

    return hook


def add_deltas(model: torch.nn.Module, rank: int, *, seed: int, weight_decay: float) -> None:
    """Give every layer's LINEARS a zero delta of rank `rank` (after the layers' weights are shared, so each
    layer keeps its own), with AdamW weight decay `weight_decay` (optim.param_groups reads it)."""
    attach_low_rank(model, rank, prefix="delta", linears=LINEARS, seed=seed, weight_decay=weight_decay)


def attach_low_rank(model: torch.nn.Module, rank: int, *, prefix: str, linears, seed: int,
                    weight_decay: float | None = None, scale: float = 1.0, dropout: float = 0.0) -> list[str]:
    """Low-rank parameters `<prefix>_A` (random) and `<prefix>_B` (zero) on each layer's `linears` that
    exist (MoE layers have no dense MLP), added by a forward hook; returns the paths of the linears. A is
    drawn whole from a generator of (seed, prefix, layer, linear) and then TP-sliced: the model depends
    on the seed only, not on the layout; the global generator is left untouched. `weight_decay`: the
    parameters' own AdamW decay (None: optim's rule for matrices)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from gorilla_dist.engine.state import tp_local

    done = []
    salt = 0 if prefix == "delta" else 1_000  # the sharing deltas keep their seeds
    for i, layer in enumerate(model.decoder.layers):
        for k, path in enumerate(linears):
            try:
                lin = layer.get_submodule(path)
            except AttributeError:
                continue
            column = isinstance(lin, ColumnParallelLinear)
            assert column or isinstance(lin, RowParallelLinear), type(lin)
            w = lin.weight
            tp = lin.tp_group.size()
            out_local, in_local = logical_shape(w)  # (also when ZeRO-3 built it partitioned)
            full_in = in_local if column else in_local * tp
            # keyed by the global layer index (a pipeline stage's layer i is layer layer_number - 1)
            g = torch.Generator().manual_seed(delta_seed(seed, layer.layer_number - 1, k + salt))
            a_full = torch.randn(rank, full_in, generator=g) / full_in ** 0.5
            a = torch.nn.Parameter(torch.empty(rank, in_local if not column else full_in, dtype=w.dtype, device=w.device))
            b = torch.nn.Parameter(torch.zeros(out_local, rank, dtype=w.dtype, device=w.device))
            sp = bool(lin.sequence_parallel and tp > 1)
            if column:  # B split over TP along its rows, as W; A whole
                b.tensor_model_parallel, b.partition_dim, b.partition_stride = True, 0, 1
                a.sequence_parallel = sp
            else:  # A split over TP along its columns, as W; B whole
                a.tensor_model_parallel, a.partition_dim, a.partition_stride = True, 1, 1
                b.sequence_parallel = sp
            if weight_decay is not None:
                a.delta_weight_decay = b.delta_weight_decay = weight_decay
            lin.register_parameter(f"{prefix}_A", a)
            lin.register_parameter(f"{prefix}_B", b)
            with torch.no_grad():
                a.copy_(tp_local(model, f"decoder.layers.{i}.{path}.{prefix}_A", a, a_full))
            lin.register_forward_hook(_low_rank_hook(prefix, scale, dropout))
            done.append(f"decoder.layers.{i}.{path}")
    return done


def is_delta(name: str, prefix: str = "delta") -> bool:
    return name.endswith((f".{prefix}_A", f".{prefix}_B"))


def merged(weights: dict[str, torch.Tensor], prefix: str = "delta", scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Full single-process weights with every low-rank pair folded into its linear (W + scale B A) and the
    pairs removed: the plain model's weights (export). Expects each layer's own weight entries (see
    export.unrolled)."""
    out = {k: v for k, v in weights.items() if not is_delta(k, prefix)}
    for name in weights:
        if name.endswith(f".{prefix}_A"):
            base = name[: -len(f".{prefix}_A")]
            delta = weights[base + f".{prefix}_B"] @ weights[name]
            out[base + ".weight"] = weights[base + ".weight"] + (delta if scale == 1.0 else scale * delta)
    return out
