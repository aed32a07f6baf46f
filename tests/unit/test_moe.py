"""Mixture of experts (model.moe): megatron-core's router and MoE layer against independent PyTorch
references (top-k choice, renormalisation, sigmoid scores, the aux and z losses, capacity dropping, the
expert-bias update), the active-parameter FLOPs, and the config's refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import composed
from omegaconf import OmegaConf

from gorilla_dist.config import ModelConfig, moe_layers, validate
from gorilla_dist.engine.moe import RouterStats, update_expert_bias
from gorilla_dist.errors import ConfigError
from gorilla_dist.model import build_model, flops_per_token

VOCAB, E, H = 50, 4, 32


def model_cfg(activation="gelu", attention="dense", position_embedding="rope", seq_length=16, sparse=None, **moe):
    base = dict(name="t", num_layers=2, hidden_size=H, num_heads=4, seq_length=seq_length, activation=activation,
                normalization="RMSNorm" if activation == "swiglu" else "LayerNorm", attention=attention,
                position_embedding=position_embedding, sparse=sparse or {}, moe=dict(num_experts=E, **moe))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), base))


def moe_layer(world1, seed=0, **moe):
    model = build_model(model_cfg(**moe), vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=seed)
    return model, model.decoder.layers[0].mlp


def tracked(name: str, layer) -> float:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return float(get_moe_layer_wise_logging_tracker()[name]["values"][layer.layer_number - 1])


def reference_routing(logits: torch.Tensor, topk: int, router: str):
    """(probs [T, E] with zeros off the chosen experts, chosen mask [T, E]) as Mixtral / Switch / DeepSeek-V3 define them."""
    if router == "softmax" and topk == 1:  # Switch: softmax over all experts, the top one keeps its probability
        scores = logits.softmax(-1)
        top = scores.topk(1, dim=-1)
        values = top.values
    elif router == "softmax":  # Mixtral: top-k logits, softmax over the chosen k (= softmax, then renormalise)
        top = logits.topk(topk, dim=-1)
        values = top.values.softmax(-1)
    else:  # DeepSeek-V3: sigmoid scores, the chosen k normalised to sum 1
        scores = logits.sigmoid()
        top = scores.topk(topk, dim=-1)
        values = top.values / top.values.sum(-1, keepdim=True)
    probs = torch.zeros_like(logits).scatter(1, top.indices, values)
    return probs, probs > 0


@pytest.mark.parametrize("router,topk", [("softmax", 2), ("softmax", 1), ("sigmoid", 2)])
def test_router_matches_reference_and_the_aux_losses_their_formulas(world1, router, topk):
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    model, layer = moe_layer(world1, topk=topk, router=router)
    model.train()
    x = torch.randn(16, 3, H, generator=torch.Generator().manual_seed(1))  # [s, b, h]
    clear_aux_losses_tracker()
    probs, routing_map = layer.router(x)
    logits = x.reshape(-1, H) @ layer.router.weight.T
    ref_probs, ref_map = reference_routing(logits, topk, router)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    # z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, logged before its coefficient
    assert tracked("z_loss", layer) == pytest.approx(float(torch.logsumexp(logits, -1).square().mean()), rel=1e-5)
    if router == "softmax":  # Switch / GShard: E * sum_i f_i * P_i, P_i the mean softmax probability
        t = logits.shape[0]
        f = ref_map.float().sum(0) / (t * topk)
        p = logits.softmax(-1).mean(0)
        assert tracked("load_balancing_loss", layer) == pytest.approx(float(E * (f * p).sum()), rel=1e-5)


def expert_mlp(x, fc1, fc2, activation):
    h = x @ fc1.T
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ fc2.T


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_layer_equals_a_plain_loop_over_experts_forward_and_gradients(world1, activation):
    model = build_model(model_cfg(activation, topk=2, shared_expert_size=24), vocab_size=VOCAB, dtype="fp32",
                        device=world1.device, seed=2)
    model.train()
    layer = model.decoder.layers[0].mlp
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out, _ = layer(x)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    # the reference: its own copies of every weight, the routing recomputed by hand
    experts = [(e.linear_fc1.weight.detach().clone().requires_grad_(), e.linear_fc2.weight.detach().clone().requires_grad_())
               for e in layer.experts.local_experts]
    shared = layer.shared_experts
    shared_w = (shared.linear_fc1.weight.detach().clone().requires_grad_(),
                shared.linear_fc2.weight.detach().clone().requires_grad_())
    router_w = layer.router.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    tokens = xr.reshape(-1, H)
    probs, chosen = reference_routing(tokens @ router_w.T, 2, "softmax")
    ref = sum(probs[:, j:j + 1] * expert_mlp(tokens, fc1, fc2, activation) * chosen[:, j:j + 1]
              for j, (fc1, fc2) in enumerate(experts))
    ref = (ref + expert_mlp(tokens, *shared_w, activation)).reshape(out.shape)
    (ref * w).sum().backward()
    # (fp32 sums in another order: measured up to 1.01e-5 on an output of ~3; a wrong routing is off by ~0.1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=2e-5, rtol=1e-5)
    for e, (fc1, fc2) in zip(layer.experts.local_experts, experts):
        torch.testing.assert_close(e.linear_fc1.weight.grad, fc1.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e.linear_fc2.weight.grad, fc2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.linear_fc1.weight.grad, shared_w[0].grad, atol=1e-5, rtol=1e-5)
    # the router's gradient: from the combine weights only (the aux / z losses add theirs through an
    # autograd hook scaled by MoEAuxLossAutoScaler; here both coefficients are the defaults, so compare
    # with them switched off)


def test_router_gradient_is_the_combine_weights_gradient_without_aux_losses(world1):
    model, layer = moe_layer(world1, seed=4, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    model.train()
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(5))
    out, _ = layer(x)
    out.square().sum().backward()
    router_w = layer.router.weight.detach().clone().requires_grad_()
    tokens = x.reshape(-1, H)
    probs, chosen = reference_routing(tokens @ router_w.T, 2, "softmax")
    ref = sum(probs[:, j:j + 1] * expert_mlp(tokens, e.linear_fc1.weight.detach(), e.linear_fc2.weight.detach(), "gelu")
              * chosen[:, j:j + 1] for j, e in enumerate(layer.experts.local_experts))
    ref.square().sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, router_w.grad, atol=1e-5, rtol=1e-5)


def test_capacity_drops_the_lowest_probability_assignments_beyond_each_experts_capacity(world1):
    factor = 0.6
    model, layer = moe_layer(world1, seed=6, capacity_factor=factor, z_loss_coeff=0.0)
    model.train()
    x = torch.randn(16, 2, H, generator=torch.Generator().manual_seed(7))
    stats = RouterStats(model, world1.device)
    probs, routing_map = layer.router(x)
    tokens = x.reshape(-1, H)
    ref_probs, ref_map = reference_routing(tokens @ layer.router.weight.T, 2, "softmax")
    t = tokens.shape[0]
    capacity = math.ceil(t * 2 / E * factor)
    kept = torch.zeros_like(ref_map)
    for j in range(E):  # each expert keeps its `capacity` highest-probability assignments
        mine = ref_probs[:, j].masked_fill(~ref_map[:, j], -1.0)
        top = mine.topk(min(capacity, int(ref_map[:, j].sum()))).indices
        kept[top, j] = True
    assert torch.equal(routing_map, kept)
    dropped_by_hand = int(ref_map.sum() - kept.sum())
    assert dropped_by_hand > 0
    numbers = stats.summarize(stats.take(1)[None], dp=1)
    assert numbers["interval"]["moe_dropped"] == pytest.approx(dropped_by_hand / (t * 2))
    assert set(numbers["per_step"]) == {"moe_aux_loss"}  # the z-loss is off: not reported


def test_router_stats_report_the_load_per_layer_relative_to_uniform(world1):
    model, layer = moe_layer(world1, seed=8)
    model.train()
    stats = RouterStats(model, world1.device)
    x = torch.randn(16, 2, H, generator=torch.Generator().manual_seed(9))
    _, routing_map = layer.router(x)
    with torch.no_grad():  # evaluation does not count
        layer.router(x)
    numbers = stats.summarize(stats.take(1)[None], dp=1)
    counts = routing_map.float().sum(0)
    assert numbers["interval"]["moe_load"][0] == pytest.approx((counts / counts.sum() * E).tolist(), abs=1e-4)
    assert numbers["interval"]["moe_load"][1] == [0.0] * E  # layer 1 saw no tokens here
    assert numbers["interval"]["moe_dropped"] == 0.0
    assert set(numbers["per_step"]) == {"moe_aux_loss", "moe_z_loss"}


def test_expert_bias_moves_against_the_load_outside_the_gradient(world1):
    model, layer = moe_layer(world1, seed=10, router="sigmoid", expert_bias=True, bias_update_rate=0.01)
    router = layer.router
    router.local_tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 6.0, 6.0]))
    update_expert_bias(model)
    assert router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    assert router.local_tokens_per_expert.sum() == 0  # counted afresh for the next step


def test_flops_count_active_parameters_only():
    dense = model_cfg()
    dense.moe.num_experts = 0
    moe = model_cfg(topk=2)
    moe8 = model_cfg(topk=2)
    moe8.moe.num_experts = 8
    h, ffn, L = H, 4 * H, 2
    # top-2 of E experts: one more MLP per layer than dense, plus the router (E x h): 8 experts cost the
    # same per token as 4, but for their router
    assert flops_per_token(moe, VOCAB) - flops_per_token(dense, VOCAB) == 6 * L * (2 * h * ffn + E * h)
    assert flops_per_token(moe8, VOCAB) - flops_per_token(moe, VOCAB) == 6 * L * 4 * h
    every2 = model_cfg(topk=2, every=2)
    assert moe_layers(every2) == [0]
    assert flops_per_token(every2, VOCAB) - flops_per_token(dense, VOCAB) == 6 * (2 * h * ffn + E * h)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.ep=2"], "model.moe.num_experts=0 (a dense model)"),
    (["model.moe.num_experts=6", "parallel.ep=4", "launch.nproc_per_node=4", "launch=torchrun"],
     "model.moe.num_experts(6) is not divisible by parallel.ep(4)"),
    (["model.moe.num_experts=4", "parallel.ep=4", "launch.nproc_per_node=2", "launch=torchrun"],
     "parallel.ep=4 must divide the data-parallel size 2"),
    (["model.moe.num_experts=4", "model.moe.topk=5"], "model.moe.topk=5 must be in [1, model.moe.num_experts=4]"),
    (["model.moe.num_experts=4", "model.moe.expert_bias=true"], "needs model.moe.router=sigmoid"),
    (["model.moe.num_experts=4", "model.moe.router=top1"], "model.moe.router='top1' is not valid"),
    (["model.moe.num_experts=4", "parallel.tp=2", "launch.nproc_per_node=2", "launch=torchrun"],
     "needs parallel.sequence_parallel=true"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=0"], "must be > 0 (or null: dropless)"),
    (["model.moe.num_experts=4", "model.moe.shared_expert_gate=true"], "but model.moe.shared_expert_size=0 (none)"),
    (["model.moe.num_experts=4", "parallel.ep=2", "launch.nproc_per_node=2", "launch=torchrun", "precision=bf16"],
     "leaves expert gradients out of the norm it clips by; use parallel.zero_stage=1"),
])
def test_impossible_moe_configs_are_refused_naming_the_numbers(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate(composed("model=debug", *overrides))


@pytest.mark.parametrize("attention", ["learned", "bigbird"])
def test_moe_trains_with_block_sparse_attention_and_alibi(world1, attention):
    """MoE MLPs beside every attention option: one forward + backward of the whole model, finite, with a
    gradient on every router, expert and the learned layout's scoring weights."""
    m = model_cfg(attention=attention, position_embedding="alibi", seq_length=64,
                  sparse=dict(block_size=16, topk=2))
    model = build_model(m, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=11).train()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(12))
    loss = model(tokens, torch.arange(64).expand(2, 64), None, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "router" in name or "local_experts" in name:
            assert p.grad.abs().sum() > 0, name


def test_a_dense_model_is_unchanged_by_the_moe_section(world1):
    """num_experts=0 (the default) builds exactly the dense model: same parameters, same values."""
    cfg = model_cfg()
    cfg.moe.num_experts = 0
    plain = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(
        name="t", num_layers=2, hidden_size=H, num_heads=4, seq_length=16)))
    a = build_model(cfg, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=1)
    b = build_model(plain, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=1)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
