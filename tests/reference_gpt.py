"""An independent plain-PyTorch forward pass of our GPT, written from the math (pre-norm transformer,
fused QKV grouped by query group, rotate-half RoPE, causal softmax attention, GELU or SwiGLU MLP),
reading megatron-core's parameters by name. Tests compare megatron's forward against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _norm(x, p: dict, prefix: str, kind: str, eps: float = 1e-5):
    w = p[f"{prefix}.weight"]
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, p.get(f"{prefix}.bias"), eps)


def _rope(x, base: float):
    # x (b, h, s, d): rotate pairs (i, i + d/2) by angle pos * base^(-2i/d)
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def reference_loss(p: dict, m, x: torch.Tensor, y: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy (b, s). p: megatron parameter name -> tensor; m: our ModelConfig."""
    b, s = x.shape
    h, nh = m.hidden_size, m.num_heads
    ng, hd = (m.num_query_groups or nh), h // nh
    emb = p["embedding.word_embeddings.weight"]
    z = emb[x]
    if m.position_embedding == "learned_absolute":
        z = z + p["embedding.position_embeddings.weight"][:s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(m.num_layers):
        L = f"decoder.layers.{i}"
        a = _norm(z, p, f"{L}.input_layernorm", m.normalization)
        qkv = (a @ p[f"{L}.self_attention.linear_qkv.weight"].T).view(b, s, ng, (nh // ng + 2) * hd)
        q, k, v = qkv.split([nh // ng * hd, hd, hd], dim=-1)
        q = q.reshape(b, s, nh, hd).transpose(1, 2)  # (b, nh, s, hd), heads ordered by group
        k, v = (t.transpose(1, 2).repeat_interleave(nh // ng, dim=1) for t in (k, v))
        if m.position_embedding == "rope":
            q, k = _rope(q, m.rotary_base), _rope(k, m.rotary_base)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, h)
        z = z + o @ p[f"{L}.self_attention.linear_proj.weight"].T
        a = _norm(z, p, f"{L}.pre_mlp_layernorm", m.normalization)
        u = a @ p[f"{L}.mlp.linear_fc1.weight"].T
        if m.activation == "swiglu":
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u)
        z = z + u @ p[f"{L}.mlp.linear_fc2.weight"].T
    z = _norm(z, p, "decoder.final_layernorm", m.normalization)
    out_w = emb if m.tie_embeddings else p["output_layer.weight"]
    logits = z @ out_w[:vocab_size].T  # the real vocabulary: padding rows take no probability
    return F.cross_entropy(logits.reshape(b * s, -1), y.reshape(-1), reduction="none").view(b, s)
