"""An attention kernel added from outside the package (editing no package file): `ToyDense`, defined here, is
the dense maths under a new name that declares no KV cache and no attention dropout. Registered in-process it
builds the same model as model.attention=dense; installed as an entry point (group gorilla_dist.attention, a
dist-info written by the test) a run started by the real launcher trains with it, and generate, asked for a
KV cache, is refused naming the capability the kernel lacks."""

from __future__ import annotations


import pytest

from gorilla_dist.kernels.registry import KERNELS, AttentionKernel, Capabilities


class ToyDense(AttentionKernel):
    """Dense attention under another name, without a KV cache (a test plug-in)."""

    name = "toydense"
    supports = Capabilities(kv_cache=False, dropout=False, prompt_tuning=True)

    @classmethod
    def module(cls, m):
        from gorilla_dist.kernels.dense import DenseAttention

        return DenseAttention, {"alibi": m.position_embedding == "alibi"}


@pytest.fixture
def registered():
    from helpers import registered_for_a_test

    yield from registered_for_a_test(KERNELS, ToyDense)


def test_the_kernel_builds_the_dense_model_and_its_declaration_is_read(world1, registered):
    import torch
    from omegaconf import OmegaConf

    from gorilla_dist.config import ModelConfig, validate
    from gorilla_dist.errors import ConfigError
    from gorilla_dist.inference import caches
    from gorilla_dist.model import build_model
    from helpers import REPO, composed

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/debug.yaml"))
    toy = OmegaConf.merge(m, {"attention": "toydense"})
    a = build_model(m, vocab_size=16, dtype="fp32", device=world1.device, seed=1).eval()
    b = build_model(toy, vocab_size=16, dtype="fp32", device=world1.device, seed=1).eval()
    ids = torch.randint(0, 16, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(b(ids, pos, None), a(ids, pos, None), rtol=0, atol=0)
    assert caches(m) and not caches(toy)
    with pytest.raises(ConfigError, match="model.attention=toydense has no attention dropout"):
        validate(composed("model=debug", "model.attention=toydense", "model.dropout=0.1"))


def test_an_installed_kernel_trains_and_generate_names_what_it_lacks(tmp_path):
    from helpers import check, generate, installed_plugin, launch, metrics

    env = installed_plugin(tmp_path, "gorilla_dist.attention", "toydense", "test_attention_plugin:ToyDense")
    run = tmp_path / "run"
    check(launch(run, "model.attention=toydense", "train.max_steps=5", env=env))
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert losses and all(x == x for x in losses)
    refused = generate(run, "cache=true", "max_new_tokens=4", env=env)
    plain = generate(run, "max_new_tokens=4", env=env)  # unset: the context is re-run each step
    assert refused.returncode == 2, refused.stderr
    assert "cache=true: model.attention=toydense does not support kv_cache" in refused.stderr
    assert plain.returncode == 0, plain.stderr
