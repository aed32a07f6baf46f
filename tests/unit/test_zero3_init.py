"""ZeRO-3 models are built partitioned (deepspeed.zero.Init around megatron's construction: no rank ever holds
the whole model) with exactly the initial weights of a whole-model build; models whose weights build_model
rewrites after construction (experts, shared layers) are built whole as before."""

import deepspeed
import torch

from gorilla_dist.engine import build_engine, partitioned_construction
from gorilla_dist.model import build_model
from gorilla_dist.train import train_step
from test_nonfinite import batch, make_engine


def test_a_zero3_model_is_built_partitioned_with_the_same_initial_weights(world1):
    _, cfg = make_engine(world1, "fp32", 3)
    whole = build_model(cfg.model, vocab_size=16, dtype="fp32", device=world1.device, seed=1)
    construct = partitioned_construction(cfg.model, cfg.parallel, cfg.precision)
    assert construct is not None
    parted = build_model(cfg.model, vocab_size=16, dtype="fp32", device=world1.device, seed=1, construct=construct)
    params = dict(parted.named_parameters())
    assert params.keys() == dict(whole.named_parameters()).keys()
    assert all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in params.values())  # partitioned at creation
    for name, p in whole.named_parameters():
        with deepspeed.zero.GatheredParameters([params[name]]):
            assert torch.equal(params[name].data, p.data), name


def test_the_first_zero3_steps_are_those_of_a_whole_model_build(world1):
    """Through the engine: the same losses and weights after three steps, built partitioned or whole (a
    partitioned parameter's placeholder is 1-d: weight decay must go by its own shape, engine.state.logical_shape)."""
    results = []
    for partitioned in (True, False):
        _, cfg = make_engine(world1, "fp32", 3)
        construct = partitioned_construction(cfg.model, cfg.parallel, cfg.precision) if partitioned else None
        model = build_model(cfg.model, vocab_size=16, dtype="fp32", device=world1.device, seed=1, construct=construct)
        e = build_engine(model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel, precision=cfg.precision,
                         layout=world1)
        losses = [float(train_step(e, [batch(i)]).loss) for i in range(3)]
        results.append((losses, e.full_state()[0]))
    (got, got_w), (want, want_w) = results
    assert got == want, (got, want)
    assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)


def test_models_rewritten_after_construction_are_built_whole(world1):
    _, cfg = make_engine(world1, "fp32", 3)
    cfg.model.moe.num_experts = 4
    assert partitioned_construction(cfg.model, cfg.parallel, cfg.precision) is None
    _, cfg = make_engine(world1, "fp32", 3)
    cfg.model.num_layers, cfg.model.sharing.unique_layers = 4, 2
    assert partitioned_construction(cfg.model, cfg.parallel, cfg.precision) is None
    _, cfg = make_engine(world1, "fp32", 2)
    assert partitioned_construction(cfg.model, cfg.parallel, cfg.precision) is None
