"""GPT-NeoX with a sequential residual and rotary positions on the whole head: rope + LayerNorm + gelu,
biases on every linear (a model of ours without biases exports zeros)."""

from __future__ import annotations

from gorilla_dist.hf.base import Adapter, Rule, refuse, rope_base

NAMES = (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm"),
         # NeoX's fused query_key_value is laid out per head as [q, k, v]: megatron's MHA layout as it is
         ("self_attention.linear_qkv", "attention.query_key_value"), ("self_attention.linear_proj", "attention.dense"),
         ("mlp.linear_fc1", "mlp.dense_h_to_4h"), ("mlp.linear_fc2", "mlp.dense_4h_to_h"))


class GPTNeoX(Adapter):
    def fields(self, config: dict, source: str) -> dict:
        partial = config.get("rotary_pct", (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            refuse(source, f"rotary_pct={partial} (rotary positions on the whole head only)")
        if config.get("use_parallel_residual", True):
            refuse(source, "use_parallel_residual=true (Pythia's parallel attention + MLP block; ours is sequential)")
        if config.get("hidden_act", "gelu") != "gelu":
            refuse(source, f"hidden_act={config['hidden_act']}")
        return {"num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
                "num_heads": config["num_attention_heads"], "num_query_groups": None,
                "ffn_hidden_size": config["intermediate_size"], "position_embedding": "rope",
                "rotary_base": rope_base(config, source),
                "normalization": "LayerNorm", "norm_eps": float(config.get("layer_norm_eps", 1e-5)),
                "activation": "gelu", "bias": True, "tie_embeddings": bool(config.get("tie_word_embeddings", False))}

    def config(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        return {"architectures": [self.hf_class], "model_type": self.model_type, "hidden_size": m.hidden_size,
                "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size, "num_hidden_layers": m.num_layers,
                "num_attention_heads": m.num_heads, "hidden_act": "gelu", "rotary_pct": 1.0,
                "rotary_emb_base": m.rotary_base, "rope_theta": float(m.rotary_base),
                "max_position_embeddings": m.seq_length, "layer_norm_eps": m.norm_eps, "use_parallel_residual": False,
                "attention_bias": True, "attention_dropout": 0.0, "hidden_dropout": 0.0,
                **self.common(m, vocab_size=vocab_size, eod=eod, dtype=dtype)}

    def rules(self, m) -> list[Rule]:
        h, ffn = m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size
        bias_size = {"self_attention.linear_qkv": 3 * h, "mlp.linear_fc1": ffn}
        rules = []
        for i in range(m.num_layers):
            ours, theirs = f"decoder.layers.{i}.", f"gpt_neox.layers.{i}."
            for a, b in NAMES:
                rules += [Rule(f"{ours}{a}.weight", (f"{theirs}{b}.weight",)),
                          Rule(f"{ours}{a}.bias", (f"{theirs}{b}.bias",), zeros=bias_size.get(a, h))]
        rules += [Rule("embedding.word_embeddings.weight", ("gpt_neox.embed_in.weight",), "vocab"),
                  Rule("decoder.final_layernorm.weight", ("gpt_neox.final_layer_norm.weight",)),
                  Rule("decoder.final_layernorm.bias", ("gpt_neox.final_layer_norm.bias",), zeros=h)]
        if not m.tie_embeddings:
            rules.append(Rule("output_layer.weight", ("embed_out.weight",), "vocab"))
        return rules


PEFT = {"self_attention.linear_qkv": ("attention.query_key_value",), "self_attention.linear_proj": ("attention.dense",),
        "mlp.linear_fc1": ("mlp.dense_h_to_4h",), "mlp.linear_fc2": ("mlp.dense_4h_to_h",)}

GPT_NEOX = GPTNeoX("gpt_neox", "GPTNeoXForCausalLM", layers="gpt_neox.layers", peft=PEFT)
