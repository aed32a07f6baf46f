"""Qwen2-MoE: Mixtral's attention and norms (no q/k/v biases), softmax top-k experts (top-1 keeps the softmax
probability, k >= 2 renormalises: its norm_topk_prob), a sigmoid-gated shared expert beside them, dense MLPs
wherever model.moe.every (its mlp_only_layers) puts them. The names are those of Qwen1.5-MoE's published
checkpoints (transformers fuses the experts on load)."""

from __future__ import annotations

from gorilla_dist.hf.base import Adapter, Rule, refuse
from gorilla_dist.hf.llama import attention_config, attention_fields, attention_rules, outer_rules, swiglu_rules


def moe_layer_ids(num_layers: int, every: int) -> list[int]:
    """Our rule (config.moe_layers): layer i has experts when i % every == 0."""
    return [i for i in range(num_layers) if i % every == 0]


class Qwen2MoE(Adapter):
    def fields(self, config: dict, source: str) -> dict:
        if config.get("qkv_bias", True):
            refuse(source, "qkv_bias=true (biases on q, k, v only; model.bias applies to every linear)")
        n, experts, k = config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]
        if bool(config.get("norm_topk_prob", False)) != (k > 1):
            refuse(source, f"norm_topk_prob={config.get('norm_topk_prob', False)} with num_experts_per_tok={k} (our "
                           "softmax router renormalises the chosen experts when it picks several, and keeps the "
                           "probability when it picks one)")
        step, only = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        sparse = [i for i in range(n) if i not in only and experts > 0 and (i + 1) % step == 0]
        every = next((e for e in range(1, n + 1) if moe_layer_ids(n, e) == sparse), None)
        if every is None:
            refuse(source, f"experts in layers {sparse} (decoder_sparse_step={step}, mlp_only_layers={sorted(only)}): "
                           "ours are in layers 0, e, 2e, ... (model.moe.every=e)")
        if not config.get("shared_expert_intermediate_size"):
            refuse(source, "no shared expert (shared_expert_intermediate_size=0): use Mixtral's layout")
        fields = attention_fields(config, source)
        return {**fields, "bias": False,
                "moe": {"num_experts": experts, "topk": k, "every": every, "router": "softmax",
                        "ffn_hidden_size": config["moe_intermediate_size"],
                        "shared_expert_size": config["shared_expert_intermediate_size"], "shared_expert_gate": True}}

    def config(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        e, ffn = m.moe, m.ffn_hidden_size or 4 * m.hidden_size
        return {"architectures": [self.hf_class], "model_type": self.model_type, **attention_config(m),
                "intermediate_size": ffn, "moe_intermediate_size": e.ffn_hidden_size or ffn,
                "shared_expert_intermediate_size": e.shared_expert_size, "use_sliding_window": False, "qkv_bias": False,
                "num_experts": e.num_experts, "num_experts_per_tok": e.topk, "norm_topk_prob": e.topk > 1,
                "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(m.num_layers) if i not in moe_layer_ids(m.num_layers, e.every)],
                "output_router_logits": False, "router_aux_loss_coef": e.aux_loss_coeff,
                **self.common(m, vocab_size=vocab_size, eod=eod, dtype=dtype)}

    def rules(self, m) -> list[Rule]:
        moe, rules = set(moe_layer_ids(m.num_layers, m.moe.every)), []
        for i in range(m.num_layers):
            ours, theirs = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
            rules += attention_rules(m, i)
            if i not in moe:
                rules += swiglu_rules(ours, theirs)
                continue
            for j in range(m.moe.num_experts):
                rules += swiglu_rules(f"{ours}experts.local_experts.{j}.", f"{theirs}experts.{j}.")
            rules += swiglu_rules(ours + "shared_experts.", theirs + "shared_expert.")
            rules += [Rule(ours + "router.weight", (theirs + "gate.weight",)),
                      Rule(ours + "shared_experts.gate_weight", (theirs + "shared_expert_gate.weight",))]
        return rules + outer_rules(m)


QWEN2_MOE = Qwen2MoE("qwen2_moe", "Qwen2MoeForCausalLM", layers="model.layers")
