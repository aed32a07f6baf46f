"""Prefix tuning (Li & Liang 2021, finetune.method=prefix): N learned key and value vectors per layer and
key/value head, put in front of each layer's keys and values; every query sees them; the model is frozen.

`PrefixEncoder` (the model's `prefix` module) holds them, as PEFT does:
  direct (prefix_projection=0): `prefix.embedding`, (N, layers, 2, groups, head_dim), split over tensor-
      parallel ranks along the key/value heads (each rank its own heads, as megatron splits attention);
  reparametrised (prefix_projection=P): `prefix.embedding` (N, hidden) through `prefix.mlp` (Linear(hidden,
      P), tanh, Linear(P, layers * 2 * groups * head_dim)), replicated on every TP rank; the output is cut
      to this rank's heads by megatron's scatter-to-TP region, whose backward all-gathers the gradient, so
      every rank computes the same full gradient for the replicated MLP.
A pre-hook on megatron's GPTModel computes the prefixes once per forward (`prefix.current`); each layer's
core attention (gorilla_dist/kernels/dense.py) reads its own through `prefix_kv`. Positions: the prefix takes positions
0..N-1 and the tokens N.., as PEFT's prefix (a key/value cache of length N) does on a transformers model:
a pre-hook shifts megatron's rotary embedding by N; the prefix keys are used as learned (not rotated);
ALiBi counts distances from the queries' shifted positions. Packing several examples per sample is refused
(train.py): the later ones would sit further from the prefix than at inference.
"""

from __future__ import annotations

import functools

import torch

PREFIX = "prefix"


class PrefixEncoder(torch.nn.Module):
    def __init__(self, n: int, layers: int, groups: int, head_dim: int, hidden: int, projection: int, *,
                 tp_rank: int, tp_size: int, seed: int, dtype, device):
        super().__init__()
        self.shape = (n, layers, 2, groups, head_dim)
        self.projection, self.tp_rank, self.tp_size = projection, tp_rank, tp_size
        g = torch.Generator().manual_seed(seed * 7_919 + 2_024)  # drawn whole, then sliced: layout-free
        if projection:
            self.embedding = torch.nn.Parameter(torch.randn(n, hidden, generator=g).to(device, dtype))
            first, second = torch.nn.Linear(hidden, projection), torch.nn.Linear(projection, layers * 2 * groups * head_dim)
            for lin in (first, second):
                bound = 1.0 / lin.in_features ** 0.5
                with torch.no_grad():
                    lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=g))
                    lin.bias.copy_(torch.empty_like(lin.bias).uniform_(-bound, bound, generator=g))
            self.mlp = torch.nn.Sequential(first, torch.nn.Tanh(), second).to(device, dtype)
        else:
            full = torch.randn(*self.shape, generator=g)
            local = full.chunk(tp_size, dim=3)[tp_rank].contiguous()
            self.embedding = torch.nn.Parameter(local.to(device, dtype))
            self.embedding.tensor_model_parallel, self.embedding.partition_dim = True, 3
            self.embedding.partition_stride = 1
        self.current = None

    def forward(self) -> torch.Tensor:
        """(N, layers, 2, groups / tp, head_dim): this rank's prefixes."""
        if not self.projection:
            return self.embedding
        out = self.mlp(self.embedding).view(self.shape)
        if self.tp_size == 1:
            return out
        from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

        heads_last = out.permute(0, 1, 2, 4, 3)  # (N, L, 2, hd, groups): megatron scatters the last dim
        return scatter_to_tensor_model_parallel_region(heads_last).permute(0, 1, 2, 4, 3)


def full_prefix(weights: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The whole model's prefixes (N, layers, 2, groups, head_dim) from single-process weights (export)."""
    e = weights[f"{PREFIX}.embedding"].float()
    if f"{PREFIX}.mlp.0.weight" not in weights:
        return e.view(shape)
    h = torch.tanh(e @ weights[f"{PREFIX}.mlp.0.weight"].float().T + weights[f"{PREFIX}.mlp.0.bias"].float())
    return (h @ weights[f"{PREFIX}.mlp.2.weight"].float().T + weights[f"{PREFIX}.mlp.2.bias"].float()).view(shape)


def _layer_prefix(encoder: PrefixEncoder, layer: int):
    kv = encoder.current  # (N, L, 2, g, hd)
    return kv[:, layer, 0], kv[:, layer, 1]


def attach_prefix(model: torch.nn.Module, n: int, projection: int, *, seed: int) -> None:
    """Add the prefix encoder, point every layer's core attention at its prefixes, and shift the rotary
    positions by N (see the module docstring)."""
    cfg = model.config
    groups = cfg.num_query_groups or cfg.num_attention_heads
    head_dim = cfg.kv_channels
    from megatron.core import parallel_state as ps

    w = model.embedding.word_embeddings.weight
    encoder = PrefixEncoder(n, len(model.decoder.layers), groups, head_dim, cfg.hidden_size, projection,
                            tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                            seed=seed, dtype=w.dtype, device=w.device)
    model.add_module(PREFIX, encoder)
    for i, layer in enumerate(model.decoder.layers):
        layer.self_attention.core_attention.prefix_kv = functools.partial(_layer_prefix, encoder, i)

    def compute(module, _args, _kwargs):
        module.prefix.current = module.prefix()

    model.register_forward_pre_hook(compute, with_kwargs=True)
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None:
        def shift(_module, args, kwargs):
            if len(args) > 1:  # forward(max_seq_len, offset, ...)
                return (args[0], args[1] + n, *args[2:]), kwargs
            kwargs["offset"] = kwargs.get("offset", 0) + n
            return args, kwargs

        rope.register_forward_pre_hook(shift, with_kwargs=True)
