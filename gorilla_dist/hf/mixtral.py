"""Mixtral (no sliding window, no router jitter): Llama's attention and norms, every MLP a softmax top-k
(k >= 2, renormalised) mixture of swiglu experts without biases, dropless. The names are those of Mixtral's
published checkpoints (w1 gate, w3 up, w2 down; transformers fuses the experts on load)."""

from __future__ import annotations

from gorilla_dist.hf.base import Adapter, Rule, refuse
from gorilla_dist.hf.llama import PEFT, attention_config, attention_fields, attention_rules, outer_rules


class Mixtral(Adapter):
    def fields(self, config: dict, source: str) -> dict:
        if config.get("router_jitter_noise"):
            refuse(source, f"router_jitter_noise={config['router_jitter_noise']}")
        bias = bool(config.get("attention_bias", False))
        if bias:
            refuse(source, "attention_bias=true (biases on the attention only; model.bias applies to every linear)")
        return {**attention_fields(config, source), "bias": False,
                "moe": {"num_experts": config["num_local_experts"], "topk": config["num_experts_per_tok"], "every": 1,
                        "router": "softmax", "ffn_hidden_size": config["intermediate_size"]}}

    def config(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        return {"architectures": [self.hf_class], "model_type": self.model_type, **attention_config(m),
                "intermediate_size": m.moe.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
                "head_dim": m.hidden_size // m.num_heads, "sliding_window": None,
                "num_local_experts": m.moe.num_experts, "num_experts_per_tok": m.moe.topk,
                "output_router_logits": False, "router_aux_loss_coef": m.moe.aux_loss_coeff, "router_jitter_noise": 0.0,
                **self.common(m, vocab_size=vocab_size, eod=eod, dtype=dtype)}

    def rules(self, m) -> list[Rule]:
        rules = []
        for i in range(m.num_layers):
            ours, moe = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
            rules += attention_rules(m, i) + [Rule(ours + "router.weight", (moe + "gate.weight",))]
            for j in range(m.moe.num_experts):
                expert, theirs = f"{ours}experts.local_experts.{j}.", f"{moe}experts.{j}."
                rules += [Rule(expert + "linear_fc1.weight", (theirs + "w1.weight", theirs + "w3.weight"), "gate_up"),
                          Rule(expert + "linear_fc2.weight", (theirs + "w2.weight",))]
        return rules + outer_rules(m)


MIXTRAL = Mixtral("mixtral", "MixtralForCausalLM", layers="model.layers",
                  peft={k: v for k, v in PEFT.items() if k.startswith("self_attention")})  # experts get no adapters
