"""GPT-2 with exact gelu: learned positions + LayerNorm + gelu, biases on every linear (a model of ours without
biases exports zeros). Its Conv1D weights are stored (in, out); c_attn is [all q; all k; all v]."""

from __future__ import annotations

from gorilla_dist.hf.base import Adapter, Rule, refuse


class GPT2Adapter(Adapter):
    def fields(self, config: dict, source: str) -> dict:
        if config.get("activation_function", "gelu_new") not in ("gelu",):
            refuse(source, f"activation_function={config.get('activation_function', 'gelu_new')} (exact gelu only; "
                           "GPT-2's published models use the tanh approximation gelu_new)")
        if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx"):
            refuse(source, "attention scaling other than 1 / sqrt(head_dim)")
        h = config["n_embd"]
        return {"num_layers": config["n_layer"], "hidden_size": h, "num_heads": config["n_head"],
                "num_query_groups": None, "ffn_hidden_size": config.get("n_inner") or 4 * h,
                "position_embedding": "learned_absolute", "normalization": "LayerNorm",
                "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)), "activation": "gelu", "bias": True,
                "tie_embeddings": bool(config.get("tie_word_embeddings", True))}

    def max_positions(self, config: dict) -> int | None:
        return config.get("n_positions")

    def config(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        return {"architectures": [self.hf_class], "model_type": self.model_type, "n_embd": m.hidden_size,
                "n_inner": m.ffn_hidden_size or 4 * m.hidden_size, "n_layer": m.num_layers, "n_head": m.num_heads,
                "n_positions": m.seq_length, "activation_function": "gelu", "layer_norm_epsilon": m.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                **self.common(m, vocab_size=vocab_size, eod=eod, dtype=dtype)}

    def rules(self, m) -> list[Rule]:
        h, ffn = m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size
        rules = []
        for i in range(m.num_layers):
            ours, theirs = f"decoder.layers.{i}.", f"transformer.h.{i}."
            rules += [Rule(ours + "self_attention.linear_qkv.weight", (theirs + "attn.c_attn.weight",), "qkv_packed_t"),
                      Rule(ours + "self_attention.linear_qkv.bias", (theirs + "attn.c_attn.bias",), "qkv_packed",
                           zeros=3 * h)]
            for a, b, codec, n in (("input_layernorm", "ln_1", "same", h), ("pre_mlp_layernorm", "ln_2", "same", h),
                                   ("self_attention.linear_proj", "attn.c_proj", "transpose", h),
                                   ("mlp.linear_fc1", "mlp.c_fc", "transpose", ffn),
                                   ("mlp.linear_fc2", "mlp.c_proj", "transpose", h)):
                rules += [Rule(f"{ours}{a}.weight", (f"{theirs}{b}.weight",), codec),
                          Rule(f"{ours}{a}.bias", (f"{theirs}{b}.bias",), zeros=n)]
        rules += [Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
                  Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",), "positions"),
                  Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
                  Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",), zeros=h)]
        if not m.tie_embeddings:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
        return rules


GPT2 = GPT2Adapter("gpt2", "GPT2LMHeadModel", layers="transformer.h")
