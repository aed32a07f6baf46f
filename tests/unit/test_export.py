"""Export to Hugging Face transformers: the exported model, loaded by transformers itself, computes the
same logits as our megatron-core model; the exported tokenizer encodes to the same ids as ours."""

import json

import pytest
import torch
import transformers  # the dev extra has it: loading the export is the point of the test
from omegaconf import OmegaConf

from gorilla_dist.config import ModelConfig
from gorilla_dist.data.tokenizer import ByteTokenizer, CharTokenizer, train_bpe
from gorilla_dist.errors import UserError
from gorilla_dist.export import architecture, write_hf
from gorilla_dist.model import build_model

VARIANTS = {  # name: (model overrides, transformers class that must load it)
    "neox-rope-layernorm-gelu-tied": ({}, "GPTNeoXForCausalLM"),
    "neox-bias-untied": (dict(bias=True, tie_embeddings=False), "GPTNeoXForCausalLM"),
    "llama-rmsnorm-swiglu-gqa-untied": (dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2,
                                             tie_embeddings=False, rotary_base=500), "LlamaForCausalLM"),
    "llama-bias-tied": (dict(normalization="RMSNorm", activation="swiglu", bias=True), "LlamaForCausalLM"),
    "gpt2-learned-bias-tied": (dict(position_embedding="learned_absolute", bias=True), "GPT2LMHeadModel"),
    "gpt2-learned-untied": (dict(position_embedding="learned_absolute", tie_embeddings=False), "GPT2LMHeadModel"),
    # softmax top-2 of 4 experts, renormalised; GQA, untied head
    "mixtral-top2-gqa-untied": (dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2,
                                     tie_embeddings=False, moe=dict(num_experts=4, topk=2, ffn_hidden_size=48)),
                                "MixtralForCausalLM"),
    "mixtral-top3-tied": (dict(normalization="RMSNorm", activation="swiglu", moe=dict(num_experts=4, topk=3)),
                          "MixtralForCausalLM"),
    # a sigmoid-gated shared expert; top-2 renormalised; layers 0 and 2 MoE, 1 and 3 dense
    "qwen2moe-top2-every2-gqa": (dict(normalization="RMSNorm", activation="swiglu", num_layers=4, num_query_groups=2,
                                      moe=dict(num_experts=4, topk=2, every=2, ffn_hidden_size=48,
                                               shared_expert_size=40, shared_expert_gate=True)),
                                 "Qwen2MoeForCausalLM"),
    # top-1: the softmax probability over all experts, not renormalised (Switch; Qwen's norm_topk_prob=false)
    "qwen2moe-top1-untied": (dict(normalization="RMSNorm", activation="swiglu", tie_embeddings=False,
                                  moe=dict(num_experts=4, topk=1, shared_expert_size=32, shared_expert_gate=True)),
                             "Qwen2MoeForCausalLM"),
}
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def model_cfg(**kw):
    base = dict(name="t", num_layers=2, hidden_size=64, num_heads=4, seq_length=16)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {**base, **kw})


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_computes_our_logits(world1, tmp_path, variant):
    overrides, cls = VARIANTS[variant]
    m = model_cfg(**overrides)
    model = build_model(m, vocab_size=len(CHARS) + 1, dtype="fp32", device=world1.device, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random (norm weights and biases included): no layout hides behind 1s or 0s
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    tok = CharTokenizer(CHARS)
    arch, n = write_hf(tmp_path / "hf", m, tok, weights)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == cls and arch == hf.config.model_type
    assert n == sum(p.numel() for p in hf.parameters())  # every weight written is a weight transformers uses
    x = torch.randint(0, tok.vocab_size, (3, 16), generator=g)
    with torch.no_grad():
        ours = model(x, torch.arange(16).expand(3, 16), None)[..., :tok.vocab_size]
        theirs = hf(input_ids=x).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.1  # random weights: logits far from zero, so the comparison has teeth


def test_tokenizers_encode_and_decode_like_ours(tmp_path):
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJuliet: é ü 日本"
    m = model_cfg()
    bpe = train_bpe([text * 3, "hello world " * 20], vocab_size=300)
    chars = CharTokenizer("".join(sorted(set(text))))
    for name, tok in {"char": chars, "byte": ByteTokenizer(), "bpe": bpe}.items():
        out = tmp_path / name
        write_hf(out, model_cfg(), tok, _random_weights(m, tok.vocab_size))
        hf = transformers.AutoTokenizer.from_pretrained(out)
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text).tolist(), name
        assert hf.eos_token_id == tok.eod, name
        assert hf.decode(ids) == tok.decode(ids) == text, name
        eod = hf.eos_token
        assert hf.decode(ids + [tok.eod] + ids[:2]) == text + eod + tok.decode(ids[:2]), name
        assert hf.decode(ids + [tok.eod], skip_special_tokens=True) == text, name
        assert json.loads((out / "config.json").read_text())["vocab_size"] == tok.vocab_size


def _random_weights(m, vocab: int) -> dict:
    """Weights with the names and shapes of a TP=1 model of config `m` (vocabulary padded to 128)."""
    h, ffn, rows = m.hidden_size, 4 * m.hidden_size, -(-vocab // 128) * 128
    w = {"embedding.word_embeddings.weight": torch.randn(rows, h), "decoder.final_layernorm.weight": torch.ones(h),
         "decoder.final_layernorm.bias": torch.zeros(h)}
    for i in range(m.num_layers):
        L = f"decoder.layers.{i}."
        w.update({L + "input_layernorm.weight": torch.ones(h), L + "input_layernorm.bias": torch.zeros(h),
                  L + "pre_mlp_layernorm.weight": torch.ones(h), L + "pre_mlp_layernorm.bias": torch.zeros(h),
                  L + "self_attention.linear_qkv.weight": torch.randn(3 * h, h),
                  L + "self_attention.linear_proj.weight": torch.randn(h, h),
                  L + "mlp.linear_fc1.weight": torch.randn(ffn, h), L + "mlp.linear_fc2.weight": torch.randn(h, ffn)})
    return w


@pytest.mark.parametrize("overrides, message", [
    (dict(position_embedding="alibi"), "no transformers architecture computes this model exactly"),
    (dict(attention="bigbird"), "model.attention=bigbird: transformers has no block-sparse attention"),
    (dict(num_query_groups=2), "gpt_neox has no grouped-query attention"),
    (dict(normalization="RMSNorm"), "model.normalization=RMSNorm"),
    (dict(normalization="RMSNorm", activation="swiglu", moe=dict(num_experts=4, shared_expert_size=32)),
     "Qwen2-MoE .* needs a sigmoid gate on the shared expert"),
    (dict(normalization="RMSNorm", activation="swiglu", moe=dict(num_experts=4, every=2)),
     "Mixtral .* needs experts in every layer"),
    (dict(normalization="RMSNorm", activation="swiglu", moe=dict(num_experts=4, topk=2, router="sigmoid", every=2)),
     "needs a softmax router choosing topk >= 2 experts \\(renormalised\\); experts in every layer"),
    (dict(moe=dict(num_experts=4)), "needs rope \\+ RMSNorm \\+ swiglu"),
])
def test_models_without_an_exact_transformers_twin_are_refused(overrides, message):
    with pytest.raises(UserError, match=message if "\\" in message else message.replace("(", r"\(")):
        architecture(model_cfg(**overrides))


ROUND_TRIP = {  # one model per architecture adapter (gorilla_dist/hf/), biases where the architecture has them
    "llama": dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2, tie_embeddings=False, bias=True),
    "gpt_neox": dict(bias=True, tie_embeddings=False),
    "gpt2": dict(position_embedding="learned_absolute", bias=True),
    "mixtral": dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2, tie_embeddings=False,
                    moe=dict(num_experts=4, topk=2, ffn_hidden_size=48)),
    "qwen2_moe": dict(normalization="RMSNorm", activation="swiglu", num_layers=4, num_query_groups=2,
                      moe=dict(num_experts=4, topk=2, every=2, ffn_hidden_size=48, shared_expert_size=40,
                               shared_expert_gate=True)),
}


@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_import_of_the_export_is_the_model(world1, tmp_path, arch):
    """export, then checkpoint.init_from=hf: of what it wrote: the same architecture fields and every weight
    equal (the embedding rows of the tokenizer's ids; padding rows come back as zeros), through one adapter."""
    from gorilla_dist.hf_import import converted, model_fields, read_config
    from gorilla_dist.model.spec import padded_vocab_size

    m = model_cfg(**ROUND_TRIP[arch])
    tok = CharTokenizer(CHARS)
    model = build_model(m, vocab_size=tok.vocab_size, dtype="fp32", device=world1.device, seed=3)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert write_hf(tmp_path / "hf", m, tok, weights)[0] == arch
    fields = model_fields(read_config(tmp_path / "hf"), "export")
    again = OmegaConf.merge(m, fields)
    expected = OmegaConf.merge(m, {"ffn_hidden_size": m.ffn_hidden_size or 4 * m.hidden_size})
    if arch == "mixtral":  # no dense MLP: its width is unused (the import gives it the experts')
        expected.ffn_hidden_size = again.ffn_hidden_size
    assert OmegaConf.to_container(again) == OmegaConf.to_container(expected)  # our architecture read back
    back = converted(tmp_path / "hf", again, tok.vocab_size, padded_vocab_size(tok.vocab_size))
    assert set(back) == set(weights)
    for name, tensor in weights.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            torch.testing.assert_close(back[name][:tok.vocab_size], tensor[:tok.vocab_size], rtol=0, atol=0)
            assert not back[name][tok.vocab_size:].any()
        else:
            torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)
