"""Cross-layer parameter sharing (model.sharing): the layer -> weight-set maps, one tensor per shared
parameter, and the shared model computing what an unshared model with the same tensors computes, with
the shared gradient the sum of that model's per-layer gradients."""

import pytest
import torch
from helpers import composed
from omegaconf import OmegaConf

from gorilla_dist.config import ModelConfig, validate
from gorilla_dist.errors import ConfigError
from gorilla_dist.model import build_model
from gorilla_dist.config import layer_weight_sets

VOCAB = 50


def model_cfg(moe=None, **sharing):
    base = dict(name="t", num_layers=6, hidden_size=32, num_heads=4, seq_length=16, sharing=sharing, moe=moe or {})
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), base)


def test_each_pattern_maps_layers_to_weight_sets():
    assert layer_weight_sets(6, 3, "sequence") == [0, 0, 1, 1, 2, 2]
    assert layer_weight_sets(6, 3, "cycle") == [0, 1, 2, 0, 1, 2]
    assert layer_weight_sets(6, 3, "cycle_rev") == [0, 1, 2, 2, 1, 0]
    assert layer_weight_sets(8, 2, "cycle_rev") == [0, 1, 0, 1, 0, 1, 1, 0]
    assert layer_weight_sets(5, 2, "sequence") == [0, 0, 0, 1, 1]  # M need not divide N: floor(i*M/N)
    assert layer_weight_sets(4, None, "cycle_rev") == layer_weight_sets(4, 4, "sequence") == [0, 1, 2, 3]
    assert layer_weight_sets(4, 1, "cycle") == [0, 0, 0, 0]


@pytest.mark.parametrize("pattern", ["sequence", "cycle", "cycle_rev"])
@pytest.mark.parametrize("share_norms,moe", [(True, None), (False, None), (True, {"num_experts": 4, "topk": 2})])
def test_a_shared_model_is_an_unshared_model_with_the_same_tensors(world1, pattern, share_norms, moe):
    """With MoE layers, the router and every expert are shared with the layer's weight set too."""
    shared = build_model(model_cfg(moe, unique_layers=3, pattern=pattern, share_norms=share_norms), vocab_size=VOCAB,
                         dtype="fp32", device=world1.device, seed=3)
    plain = build_model(model_cfg(moe), vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=3)
    sets = layer_weight_sets(6, 3, pattern)
    owner = {j: sets.index(j) for j in set(sets)}
    # one tensor per shared parameter: 3 layers' worth (plus per-layer norms when they are not shared)
    per_layer = dict(plain.decoder.layers[0].named_parameters())
    norms = sum(p.numel() for n, p in per_layer.items() if "layernorm" in n)
    layer_numel = sum(p.numel() for p in per_layer.values())
    rest = sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("decoder.layers."))
    expected = rest + 3 * layer_numel + (0 if share_norms else 3 * norms)
    assert sum(p.numel() for p in shared.parameters()) == expected
    with torch.no_grad():  # the unshared model gets the shared model's tensors, layer by layer
        for i, j in enumerate(sets):
            source = dict(shared.decoder.layers[i].named_parameters(remove_duplicate=False))
            for name, p in plain.decoder.layers[i].named_parameters():
                p.copy_(source[name])
        for name, p in plain.named_parameters():
            if not name.startswith("decoder.layers."):
                p.copy_(shared.get_parameter(name))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, VOCAB, (2, 16), generator=g), torch.randint(0, VOCAB, (2, 16), generator=g)
    pos = torch.arange(16).expand(2, 16)
    a, b = shared(x, pos, None, labels=y).mean(), plain(x, pos, None, labels=y).mean()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    a.backward()
    b.backward()
    for j, i in owner.items():  # the shared gradient is the sum over the layers that use the set
        users = [k for k, s in enumerate(sets) if s == j]
        for name, p in shared.decoder.layers[i].named_parameters():
            if not share_norms and "layernorm" in name:
                continue
            want = sum(plain.decoder.layers[k].get_parameter(name).grad for k in users)
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)
    assert len(set(sets)) == 3 and any(len([s for s in sets if s == j]) > 1 for j in set(sets))


@pytest.mark.parametrize("overrides, message", [
    (["model.sharing.unique_layers=3"], "model.sharing.unique_layers=3 must be in [1, model.num_layers=2]"),
    (["model.sharing.unique_layers=0"], "model.sharing.unique_layers=0 must be in [1, model.num_layers=2]"),
    (["model.sharing.pattern=spiral"], "model.sharing.pattern='spiral' is not valid; choose one of: sequence, "
                                       "cycle, cycle_rev"),
    (["model.sharing.unique_layers=1", "parallel.activation_checkpointing=full", "parallel.zero_stage=2"],
     "with parallel.activation_checkpointing=full and parallel.zero_stage=2: megatron's full recompute"),
    (["model.num_layers=4", "model.sharing.unique_layers=2", "model.sharing.pattern=sequence", "model.moe.num_experts=4",
      "model.moe.every=2"], "gives layers [0, 1] one weight set, but model.moe.every=2 makes [0] MoE"),
    (["model.sharing.lora_rank=4"], "model.sharing.lora_rank=4 relaxes shared weights, but no layers share"),
    (["model.sharing.unique_layers=1", "model.sharing.lora_rank=4", "model.moe.num_experts=4"],
     "per-layer deltas on experts are not built"),
])
def test_impossible_sharing_is_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(composed("model=debug", *overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("pattern", ["sequence", "cycle", "cycle_rev"])
def test_export_unrolls_the_shared_layers_into_a_plain_transformers_model(world1, tmp_path, pattern):
    """A shared 6-layer model (3 weight sets, per-layer norms) exports as a 6-layer GPT-NeoX whose logits
    are ours; the file holds every layer, written once per layer."""
    model, hf, arch, n = export_random(world1, tmp_path, model_cfg(unique_layers=3, pattern=pattern, share_norms=False))
    assert arch == "gpt_neox" and hf.config.num_hidden_layers == 6
    assert n == sum(p.numel() for p in hf.parameters()) > sum(p.numel() for p in model.parameters())


def export_random(world1, tmp_path, m):
    """Our model of config `m` with every parameter random (each shared tensor once), exported and loaded by
    transformers, which must compute our logits: (our model, transformers' model, architecture, numbers written)."""
    import transformers

    from gorilla_dist.data.tokenizer import CharTokenizer
    from gorilla_dist.export import write_hf

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.")
    model = build_model(m, vocab_size=tok.vocab_size, dtype="fp32", device=world1.device, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    arch, n = write_hf(tmp_path / "hf", m, tok, weights)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, tok.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        ours = model(x, torch.arange(16).expand(2, 16), None)[..., :tok.vocab_size]
        theirs = hf(input_ids=x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.1
    return model, hf, arch, n


def test_a_checkpoint_with_other_sharing_is_refused_with_the_reason(world1, tmp_path):
    from test_nonfinite import engine_for, make_engine

    from gorilla_dist.checkpoint import Checkpointer
    from gorilla_dist.errors import CheckpointError

    engine, cfg = make_engine(world1, "fp32", 0, run_dir=tmp_path)
    ckpt = Checkpointer(cfg, world1).save(1, engine, {})
    cfg.model.sharing.unique_layers = 1
    other = engine_for(cfg, world1)
    with pytest.raises(CheckpointError, match=r"written by a model with model.sharing none, this run has "
                                              r"unique_layers=1 pattern=cycle_rev share_norms=true"):
        Checkpointer(cfg, world1).load(ckpt, other)


def test_the_learned_layouts_scoring_parameters_are_shared_with_their_layer(world1):
    m = model_cfg(unique_layers=2, pattern="cycle")
    m.attention, m.seq_length, m.sparse.block_size, m.sparse.topk = "learned", 32, 16, 2
    model = build_model(m, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=3)
    scoring = [dict(layer.self_attention.core_attention.named_parameters(remove_duplicate=False))
               for layer in model.decoder.layers]
    assert scoring[0] and scoring[0].keys() == scoring[2].keys()
    assert all(scoring[0][k] is scoring[2][k] is scoring[4][k] for k in scoring[0])  # set 0: layers 0, 2, 4
    assert all(scoring[1][k] is scoring[3][k] and scoring[1][k] is not scoring[0][k] for k in scoring[1])


def relaxed_cfg(**sharing):
    base = dict(name="t", num_layers=4, hidden_size=32, num_heads=4, seq_length=16, activation="swiglu",
                normalization="RMSNorm", sharing=dict(unique_layers=2, pattern="cycle", **sharing))
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), base)


def test_relaxed_sharing_starts_as_the_shared_model_and_its_deltas_make_layers_differ(world1):
    from gorilla_dist.optim import param_groups

    relaxed = build_model(relaxed_cfg(lora_rank=4, delta_weight_decay=0.05), vocab_size=VOCAB, dtype="fp32",
                          device=world1.device, seed=3)
    shared = build_model(relaxed_cfg(), vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (2, 16), generator=g)
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():  # B = 0 at init: exactly the shared model (the rest of the init unchanged by the deltas)
        assert torch.equal(relaxed(x, pos, None)[..., :VOCAB], shared(x, pos, None)[..., :VOCAB])
    deltas = {n: p for n, p in relaxed.named_parameters() if ".delta_" in n}
    assert len(deltas) == 4 * 4 * 2  # every layer, 4 linears, A and B
    groups = param_groups(relaxed, 0.1)
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in deltas.values()}
    assert groups[-1]["weight_decay"] == 0.05
    opt = torch.optim.AdamW(groups, lr=1e-2)
    relaxed(x, pos, None, labels=x).mean().backward()
    opt.step()
    layers = relaxed.decoder.layers  # cycle: layers 0 and 2 use set 0
    assert layers[0].mlp.linear_fc1.weight is layers[2].mlp.linear_fc1.weight  # still one shared tensor
    b0, b2 = layers[0].mlp.linear_fc1.delta_B, layers[2].mlp.linear_fc1.delta_B
    assert b0.abs().sum() > 0 and b2.abs().sum() > 0 and not torch.equal(b0, b2)  # the deltas differ per layer


def test_relaxed_model_exports_with_each_layers_delta_merged(world1, tmp_path):
    """The export unrolls the sets and adds each layer's B A to its copy: a plain 4-layer Llama with our
    logits (random deltas, so every layer's weights differ)."""
    _, hf, arch, n = export_random(world1, tmp_path, relaxed_cfg(lora_rank=3))
    assert arch == "llama" and hf.config.num_hidden_layers == 4
    assert n == sum(p.numel() for p in hf.parameters())  # no delta left over: all merged
