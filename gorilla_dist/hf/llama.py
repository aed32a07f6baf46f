"""Llama (and Mistral-shaped models without a sliding window): rope + RMSNorm + swiglu, grouped-query
attention, optional biases on every linear. Its attention and norms are Mixtral's and Qwen2-MoE's too."""

from __future__ import annotations

from gorilla_dist.hf.base import Adapter, Rule, refuse, rope_base


def attention_fields(config: dict, source: str) -> dict:
    """The fields Llama, Mistral, Mixtral and Qwen2-MoE share: sizes, rotary positions, RMSNorm, swiglu."""
    h, nh = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, h // nh):
        refuse(source, f"head_dim={config['head_dim']} differs from hidden_size / num_attention_heads = {h // nh}")
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        refuse(source, f"sliding_window={config['sliding_window']} (attention over the whole context only)")
    if config.get("hidden_act", "silu") != "silu":
        refuse(source, f"hidden_act={config['hidden_act']} (swiglu with silu only)")
    return {"num_layers": config["num_hidden_layers"], "hidden_size": h, "num_heads": nh,
            "num_query_groups": config.get("num_key_value_heads") or nh, "ffn_hidden_size": config["intermediate_size"],
            "position_embedding": "rope", "rotary_base": rope_base(config, source), "normalization": "RMSNorm",
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "activation": "swiglu",
            "tie_embeddings": bool(config.get("tie_word_embeddings", False))}


def attention_config(m) -> dict:
    h, nh = m.hidden_size, m.num_heads
    return {"hidden_size": h, "num_hidden_layers": m.num_layers, "num_attention_heads": nh,
            "num_key_value_heads": m.num_query_groups or nh, "hidden_act": "silu",
            "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_eps, "rope_theta": float(m.rotary_base),
            "attention_dropout": 0.0}


def attention_rules(m, i: int) -> list[Rule]:
    """Layer i's norms and attention (megatron's fused QKV <-> q/k/v_proj)."""
    ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
    rules = [Rule(ours + "input_layernorm.weight", (theirs + "input_layernorm.weight",)),
             Rule(ours + "pre_mlp_layernorm.weight", (theirs + "post_attention_layernorm.weight",)),
             Rule(ours + "self_attention.linear_qkv.weight",
                  tuple(f"{theirs}self_attn.{x}_proj.weight" for x in "qkv"), "qkv"),
             Rule(ours + "self_attention.linear_proj.weight", (theirs + "self_attn.o_proj.weight",))]
    if m.bias:
        rules += [Rule(ours + "self_attention.linear_qkv.bias", tuple(f"{theirs}self_attn.{x}_proj.bias" for x in "qkv"),
                       "qkv"),
                  Rule(ours + "self_attention.linear_proj.bias", (theirs + "self_attn.o_proj.bias",))]
    return rules


def swiglu_rules(ours: str, theirs: str, bias: bool = False) -> list[Rule]:
    """A swiglu MLP: megatron's fc1 is [gate; up] (act(first half) * second half), fc2 the down projection."""
    rules = [Rule(ours + "linear_fc1.weight", (theirs + "gate_proj.weight", theirs + "up_proj.weight"), "gate_up"),
             Rule(ours + "linear_fc2.weight", (theirs + "down_proj.weight",))]
    if bias:
        rules += [Rule(ours + "linear_fc1.bias", (theirs + "gate_proj.bias", theirs + "up_proj.bias"), "gate_up"),
                  Rule(ours + "linear_fc2.bias", (theirs + "down_proj.bias",))]
    return rules


def outer_rules(m) -> list[Rule]:
    """Embedding, final norm and (untied) LM head, under Llama's names."""
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
             Rule("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not m.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


class Llama(Adapter):
    def fields(self, config: dict, source: str) -> dict:
        bias = bool(config.get("attention_bias", False))
        if bool(config.get("mlp_bias", bias)) != bias:
            refuse(source, "attention_bias and mlp_bias differ (model.bias applies to every linear)")
        return {**attention_fields(config, source), "bias": bias}

    def config(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        return {"architectures": [self.hf_class], "model_type": self.model_type, **attention_config(m),
                "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size, "head_dim": m.hidden_size // m.num_heads,
                "rope_scaling": None, "attention_bias": bool(m.bias), "mlp_bias": bool(m.bias),
                **self.common(m, vocab_size=vocab_size, eod=eod, dtype=dtype)}

    def rules(self, m) -> list[Rule]:
        layers = [r for i in range(m.num_layers) for r in
                  attention_rules(m, i) + swiglu_rules(f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp.", m.bias)]
        return layers + outer_rules(m)


PEFT = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attention.linear_proj": ("self_attn.o_proj",),
        "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"), "mlp.linear_fc2": ("mlp.down_proj",)}

LLAMA = Llama("llama", "LlamaForCausalLM", reads=("mistral",), layers="model.layers", peft=PEFT)
