"""checkpoint.init_from=hf:<dir>, the inverse of export: locally created random-weight transformers models
(no download) of each importable architecture (each through its adapter, gorilla_dist/hf/) become our model with the same logits (1e-4); configurations
our model does not compute are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from gorilla_dist.config import ModelConfig
from gorilla_dist.errors import ConfigError
from gorilla_dist.hf_import import converted, model_fields, read_config

VOCAB = 300  # more embedding rows than the tokenizer's 257 ids: the extra rows are dropped

ARCHS = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500000.0,
                  tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, use_parallel_residual=False, rotary_pct=1.0, layer_norm_eps=1e-5,
                 tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64,
             activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                tie_word_embeddings=False, router_jitter_noise=0.0)),
    # layer 0 experts (top-2 renormalised) + a gated shared expert, layer 1 a dense MLP (model.moe.every=2)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=48, shared_expert_intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=True, qkv_bias=False, mlp_only_layers=[1], tie_word_embeddings=False)),
}


def hf_model(tmp_path, arch: str):
    """A random transformers model saved with save_pretrained, and a tokenizer.json beside it."""
    import transformers

    from gorilla_dist.data.tokenizer import ByteTokenizer
    from gorilla_dist.export import hf_tokenizer

    config_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **kw)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / arch
    model.save_pretrained(out)
    text, _ = hf_tokenizer(ByteTokenizer())
    (out / "tokenizer.json").write_text(text)
    return out, model


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_model_computes_the_transformers_logits(world1, tmp_path, arch):
    from gorilla_dist.checkpoint import load_consolidated
    from gorilla_dist.data.tokenizer import load_hf_tokenizer
    from gorilla_dist.model import build_model
    from gorilla_dist.model.spec import padded_vocab_size

    directory, hf = hf_model(tmp_path, arch)
    fields = model_fields(read_config(directory), str(directory))
    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "hf", "seq_length": 32, **fields})
    vocab = load_hf_tokenizer(str(directory)).vocab_size
    ours = build_model(m, vocab_size=vocab, dtype="fp32", device=world1.device, seed=0).eval()
    load_consolidated(ours, converted(directory, m, vocab, padded_vocab_size(vocab)), str(directory))
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits[..., :vocab]
        mine = ours(ids, torch.arange(32)[None].expand(2, -1), None)[..., :vocab]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt_neox", "use_parallel_residual": True}, "use_parallel_residual=true"),
    ({"model_type": "gpt_neox", "use_parallel_residual": False, "rotary_pct": 0.25}, "rotary_pct=0.25"),
    ({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"model_type": "gpt2", "activation_function": "gelu_new"}, "activation_function=gelu_new"),
    ({"model_type": "t5"}, "model_type='t5'; importable: llama"),
    ({"model_type": "qwen2_moe", "qkv_bias": True}, "qkv_bias=true"),
    ({"model_type": "qwen2_moe", "qkv_bias": False, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False},
     "norm_topk_prob=False with num_experts_per_tok=2"),
    ({"model_type": "qwen2_moe", "qkv_bias": False, "num_experts": 4, "num_experts_per_tok": 1, "mlp_only_layers": [0]},
     r"experts in layers \[1\]"),
])
def test_what_our_model_does_not_compute_is_refused(change, message):
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64, **change}
    with pytest.raises(ConfigError, match=message):
        model_fields(config, "somewhere")


def test_the_data_must_use_the_models_tokenizer(tmp_path):
    from gorilla_dist.data.tokenizer import ByteTokenizer, load_hf_tokenizer, save_tokenizer
    from gorilla_dist.errors import CheckpointError
    from gorilla_dist.hf_import import check_tokenizer

    directory, _ = hf_model(tmp_path, "gpt2")
    save_tokenizer(load_hf_tokenizer(str(directory)), tmp_path / "ours.json")  # data prepared with tokenizer=<dir>
    check_tokenizer(directory, tmp_path / "ours.json")
    save_tokenizer(ByteTokenizer(), tmp_path / "byte.json")
    with pytest.raises(CheckpointError, match="was not prepared with the model's tokenizer"):
        check_tokenizer(directory, tmp_path / "byte.json")
